"""The two parts of the data (perceptio_core.data.sources): the training sources and the evaluation
benchmarks are read, checked and fingerprinted apart, so a benchmark edit leaves the training digest
as it is; a data root holds what it holds, and every dataset the config names that it lacks is
listed in one error with the --set that skips it."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from perceptio_core.config import DataConfig, load_config
from perceptio_core.data.records import Benchmarks, MissingDataError
from perceptio_core.data.sources import (
    BENCHMARKS,
    PARTS,
    TRAINING,
    data_fingerprint,
    read_benchmarks,
    read_sources,
    read_training_sources,
    resolve_paths,
)


def test_training_sources_and_benchmarks_are_read_apart(tiny_world, tmp_path):
    train = read_training_sources(tiny_world, DataConfig())
    bench = read_benchmarks(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    assert train.hardblink == train.mcq == train.mme == [] and train.refs and train.ade and train.captions
    assert len(bench.hardblink) == 6 and len(bench.mcq) == 12 and len(bench.mme) == 16 and bench.quarantine == []
    assert bench.counts() == {"hardblink": 6, "hardblink_3": 2, "hardblink_4": 2, "hardblink_5": 2, "mcq": 12,
                              "mcq.mmbench": 12, "mme": 16, "quarantined": 0}
    # together they are what read_sources reads in one go, and what evaluation is given
    assert read_sources(tiny_world, DataConfig(), cache_dir=tmp_path / "cache") == train.with_benchmarks(bench)
    assert Benchmarks.from_json(bench.to_json()) == bench


def _flip_first_answer(answers: Path) -> None:
    text = answers.read_text()
    flipped = text.replace('"(A)"', '"(Z)"', 1) if '"(A)"' in text else text.replace('"(B)"', '"(Z)"', 1)
    assert flipped != text
    answers.write_text(flipped)


def test_a_benchmark_edit_changes_the_benchmark_digest_only(tiny_world, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_world, root)
    cfg = DataConfig()

    def digests() -> tuple[str, str]:
        return data_fingerprint(root, cfg, (TRAINING,)), data_fingerprint(root, cfg, (BENCHMARKS,))

    train, bench = digests()
    _flip_first_answer(root / "HardBLINK" / "answers" / "blink_3pointscenter_answers.jsonl")
    assert digests()[0] == train and digests()[1] != bench
    train, bench = digests()
    tsv = root / "vqa" / "mmbench_world.tsv"
    tsv.write_text(tsv.read_text() + tsv.read_text().splitlines()[-1] + "\n")  # one more row
    assert digests()[0] == train and digests()[1] != bench
    train, bench = digests()
    mme = root / "MME_Benchmark_release_version" / "count"
    qa = next(mme.glob("*.txt"))
    qa.write_text(qa.read_text().replace("\tYes", "\tNo", 1))
    assert digests()[0] == train and digests()[1] != bench
    train, bench = digests()
    hb_image = next((root / "HardBLINK" / "images").rglob("*.png"))
    depth = root / "depth" / f"{hb_image.stem}.npy"  # the true depth of a HardBLINK image only
    assert depth.is_file()
    depth.write_bytes(depth.read_bytes() + b"\0" * 16)
    assert digests()[0] == train and digests()[1] != bench
    # benchmark settings are not training key material, and the other way round
    assert data_fingerprint(root, DataConfig(mcq={}, mme=""), (TRAINING,)) == train
    assert data_fingerprint(root, DataConfig(ade20k=""), (BENCHMARKS,)) == digests()[1]
    train, bench = digests()
    refs = root / "refcocog" / "refs(umd).p"
    refs.write_bytes(pickle.dumps(pickle.loads(refs.read_bytes())[:-1], protocol=2))
    assert digests()[0] != train and digests()[1] == bench


def test_a_generated_world_is_keyed_by_what_lies_outside_it(tiny_world, tmp_path):
    """``generated``: nothing under the (maybe not yet generated) root is checked or read; a
    benchmark named by an absolute path outside it is, by content."""
    nowhere = tmp_path / "not-generated-yet"
    assert data_fingerprint(nowhere, DataConfig(), PARTS, generated=True) == \
        data_fingerprint(tmp_path / "elsewhere", DataConfig(), PARTS, generated=True)  # the root's path is not key material
    hb = tmp_path / "HardBLINK"
    shutil.copytree(tiny_world / "HardBLINK", hb)
    cfg = DataConfig(hardblink=str(hb))
    fp = data_fingerprint(nowhere, cfg, (BENCHMARKS,), generated=True)
    _flip_first_answer(hb / "answers" / "blink_3pointscenter_answers.jsonl")
    assert data_fingerprint(nowhere, cfg, (BENCHMARKS,), generated=True) != fp
    with pytest.raises(MissingDataError, match=re.escape(f"{tmp_path / 'gone'} (skip it: --set data.hardblink=)")):
        data_fingerprint(nowhere, DataConfig(hardblink=str(tmp_path / "gone")), (BENCHMARKS,), generated=True)


def _sets(err: MissingDataError) -> list[str]:
    """The ``--set`` overrides the error suggests, as ``load_config`` takes them."""
    return [s.strip().strip("'") for m in err.missing for s in m.skip.split("--set ") if s.strip()]


def test_every_missing_dataset_is_named_in_one_error_with_its_set(tiny_world, tmp_path):
    root = tmp_path / "partial"
    shutil.copytree(tiny_world, root)
    for gone in ("ADEChallengeData2016", "HardBLINK", "refcoco+"):
        shutil.rmtree(root / gone)
    (root / "vqa" / "mmbench_world.tsv").unlink()
    shutil.rmtree(root / "MME_Benchmark_release_version")
    (root / "llava" / "llava_world.json").unlink()
    with pytest.raises(MissingDataError) as info:
        resolve_paths(root, DataConfig())
    err = info.value
    lines = str(err).splitlines()
    assert lines[0] == "6 datasets named by the config are missing:"
    assert lines[1:] == [
        f"  REFER dataset folder (refcoco+, in data.refer_datasets) not found: {root / 'refcoco+'} "
        "(skip it: --set 'data.refer_datasets=[refcoco, refcocog]')",
        f"  ADE20k folder (data.ade20k) not found: {root / 'ADEChallengeData2016'} (skip it: --set data.ade20k=)",
        f"  LLaVA instruction JSON (data.llava_json) not found: {root / 'llava' / 'llava_world.json'} "
        "(skip it: --set data.llava_json=)",
        f"  HardBLINK folder (data.hardblink) not found: {root / 'HardBLINK'} (skip it: --set data.hardblink=)",
        f"  multiple-choice TSV 'mmbench' (data.mcq.mmbench) not found: {root / 'vqa' / 'mmbench_world.tsv'} "
        "(skip it: --set data.mcq.mmbench=)",
        f"  MME folder (data.mme) not found: {root / 'MME_Benchmark_release_version'} (skip it: --set data.mme=)",
    ]
    # a reader of one part is not stopped by the other's
    with pytest.raises(MissingDataError) as info:
        read_training_sources(root, DataConfig())
    assert [m.skip for m in info.value.missing] == [
        "--set 'data.refer_datasets=[refcoco, refcocog]'", "--set data.ade20k=", "--set data.llava_json="]
    with pytest.raises(MissingDataError) as info:
        read_benchmarks(root, DataConfig(), cache_dir=tmp_path / "cache")
    assert [m.skip for m in info.value.missing] == ["--set data.hardblink=", "--set data.mcq.mmbench=",
                                                    "--set data.mme="]
    # the suggested --set lines, applied, read the rest without error
    cfg = load_config("tiny", [f"data.root={root}", *_sets(err)])
    s = read_sources(root, cfg.data, cache_dir=tmp_path / "cache")
    assert {r.dataset for r in s.refs} == {"refcoco", "refcocog"} and not s.ade and not s.hardblink and not s.mcq


def refcoco_only_root(world: Path, dest: Path) -> Path:
    """A data root with the REFER trees and their COCO images and nothing else, copied from ``world``."""
    shutil.copytree(world / "images" / "train2014", dest / "images" / "train2014")
    for ds in ("refcoco", "refcoco+", "refcocog"):
        shutil.copytree(world / ds, dest / ds)
    return dest


def test_a_refcoco_only_root_reads_with_the_listed_sets(tiny_world, tmp_path):
    root = refcoco_only_root(tiny_world, tmp_path / "refcoco-only")
    with pytest.raises(MissingDataError) as info:
        read_training_sources(root, DataConfig())
    # the training part lacks ADE20k, the captions, the LLaVA and GLaMM files: all four named at once
    assert [m.skip for m in info.value.missing] == ["--set data.captions=", "--set data.ade20k=",
                                                    "--set data.llava_json=", "--set data.glamm_json="]
    cfg = load_config("tiny", [f"data.root={root}", *_sets(info.value)])
    s = read_training_sources(root, cfg.data)
    assert s.quarantine == [] and len(s.coco_images) == 24
    assert {r.dataset for r in s.refs} == {"refcoco", "refcoco+", "refcocog"}
    assert not s.ade and not s.captions and all(r.depth_path is None for r in s.coco_images.values())
    assert read_benchmarks(root, DataConfig(hardblink="", mcq={}, mme="")).counts()["hardblink"] == 0
    assert json.loads(s.to_json())["refs"]


def test_the_base_fit_reads_the_train_vqa_from_the_instruction_file_not_the_benchmark(tiny_world, tmp_path):
    """The offline base used to take its VQA examples from the TSV's train split; it now reads them
    from the LLaVA instruction file (a training source), which holds the same questions as rounds of
    its conversations (and a yes/no round per image besides): the same prompts, answers and image
    bytes, so the benchmark TSV keys and feeds no training stage."""
    from perceptio_core.format.prompts import format_mc_prompt
    from perceptio_core.training.base_fit import instruction_examples

    bench = read_benchmarks(tiny_world, DataConfig(), cache_dir=tmp_path / "cache")
    from_tsv = [(q.image_path, format_mc_prompt(q.question, q.options, q.hint), q.answer)
                for q in bench.mcq if q.split == "train"]
    every = instruction_examples(tiny_world / "llava" / "llava_world.json")
    yes_no = [e for e in every if e[1].endswith("Please answer yes or no.")]
    from_llava = [e for e in every if e not in yes_no]
    assert from_tsv and [e[1:] for e in from_llava] == [e[1:] for e in from_tsv]
    assert [Path(e[0]).read_bytes() for e in from_llava] == [Path(e[0]).read_bytes() for e in from_tsv]
    assert yes_no and {e[2] for e in yes_no} <= {"Yes", "No"}
