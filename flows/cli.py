"""The ``perceptio`` command line (ARCHITECTURE.md, CLI contract).

Heavy modules (torch, transformers, Prefect) are imported by the commands that use them, never at
the top of this module, so ``--help`` and a config error answer at once (bench/bench_cli.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perceptio_core.config import ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="profile name (configs/NAME.yaml) or YAML file (a path: with a / or a .yaml suffix); "
                        "default: the workdir's own (its perceptio-workdir.json), else tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set vqvae.steps=200 (repeatable); with --config or "
                        "--set the profile is as given, the workdir's own is not used")
    p.add_argument("--workdir", default=None, help="working folder (default: run.workdir of the profile)")


def use_workdir_profile(args: argparse.Namespace) -> str:
    """Settle ``args.config`` / ``args.overrides`` of a command given neither: the profile and
    overrides the workdir remembers from its last run (``<workdir>/perceptio-workdir.json``, written
    by ``perceptio run`` and ``perceptio ablate``), else the default profile ``tiny``. The workdir is
    ``--workdir``, else the default profile's ``run.workdir``; a remembered profile is used in that
    folder, wherever the profile's own ``run.workdir`` points. Giving ``--config`` or ``--set`` means
    "as given": nothing is remembered (``--set`` alone is on ``tiny``). Returns the line saying what
    was used and where it came from ("" when ``--config`` was given)."""
    from perceptio_core.config import DEFAULT_PROFILE, WORKDIR_RECORD, load_config, remembered_profile

    if args.config is not None:
        return ""
    wd = Path(args.workdir if args.workdir else load_config(DEFAULT_PROFILE).run.workdir).expanduser()
    rec = remembered_profile(wd)
    if args.overrides or rec is None:
        args.config = DEFAULT_PROFILE
        why = (f"--set given, so {wd / WORKDIR_RECORD} (profile {rec[0]}) is not used" if rec is not None
               else f"{wd} has no {WORKDIR_RECORD}")  # fmt: skip
        return f"perceptio: profile {DEFAULT_PROFILE} (the default: {why})"
    args.config, args.overrides = rec
    if args.workdir is None:
        args.workdir = str(wd)
    sets = " ".join(f"--set {o}" for o in rec[1]) or "no overrides"
    return f"perceptio: profile {rec[0]}, {sets} (remembered in {wd / WORKDIR_RECORD}; --config or --set to choose)"


def _config(args: argparse.Namespace) -> Any:
    """The config of a command's ``--config``/``--set``/``--workdir`` (without importing Prefect)."""
    from perceptio_core.config import load_config

    return load_config(args.config, [*args.overrides, *([f"run.workdir={args.workdir}"] if args.workdir else [])])


def _store(cfg: Any) -> Any:
    """The artifact store of ``cfg`` (``run.store``, else ``<workdir>/store``)."""
    from storage import ArtifactStore

    wd = Path(cfg.run.workdir).expanduser().resolve()
    return ArtifactStore(cfg.run.store or str(wd / "store"), cache_dir=wd / "cache")


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import perceptio_pipeline, summary_table

    summary = perceptio_pipeline(
        profile=args.config, overrides=args.overrides, workdir=args.workdir,
        only=args.only, from_stage=args.from_stage,
    )
    print(summary_table(summary))
    print(f"summary: {Path(summary['workdir']) / 'runs' / summary['run_id'] / 'summary.json'}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from perceptio_core.evaluation.ablation import parse_variants

    from perceptio_core.config import remember_profile

    from flows.ablate import perceptio_ablate

    try:
        variants = parse_variants(args.variants)
    except ValueError as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2
    # the workdir remembers the ablation's own profile and overrides (its variants' pipeline runs,
    # subflows, leave the record alone)
    remember_profile(_config(args).run.workdir, args.config, args.overrides, command="perceptio ablate")
    res = perceptio_ablate(profile=args.config, overrides=args.overrides, workdir=args.workdir,
                           variants=[v for v in variants if v != "full"])
    for v, r in res["runs"].items():
        print(f"{v:<10} computed: {', '.join(r['computed']) or 'nothing (all in the store)'}")
    print(Path(res["table"]).read_text())
    print(f"table: {res['table']}\njson: {res['json']}")
    return 0


def _cmd_stages(args: argparse.Namespace) -> int:
    from tasks.runner import compute_keys
    from tasks.stages import STAGES

    cfg = _config(args)
    keys = compute_keys(cfg, STAGES, Path(cfg.run.workdir).expanduser().resolve())
    store = _store(cfg)
    rows = []
    print(f"store {store.url}")
    print(f"{'stage':<16}{'key':<22}{'state':<7}upstream")
    for spec in STAGES:
        if spec.name not in keys:
            print(f"{spec.name:<16}{'-':<22}{'off':<7}(not in the DAG under this config)")
            continue
        key = keys[spec.name][0]
        fresh = store.has(spec.name, key)
        rows.append({"stage": spec.name, "key": key, "fresh": fresh, "upstream": list(spec.upstream)})
        print(f"{spec.name:<16}{key:<22}{'fresh' if fresh else 'stale':<7}{', '.join(spec.upstream)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from perceptio_core.config import load_config
    from perceptio_core.world.synth import generate_world

    ov = list(args.overrides)
    if args.images is not None:
        ov.append(f"synth.images={args.images}")
    if args.seed is not None:
        ov.append(f"synth.seed={args.seed}")
    cfg = load_config(args.config, ov)
    info = generate_world(Path(args.out), cfg.synth, progress=True)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from storage import format_lineage, lineage

    cfg = _config(args)
    wd = Path(cfg.run.workdir).expanduser().resolve()
    store = _store(cfg)
    ref = args.artifact
    if ref in _stage_names():  # a bare stage name: the artifact of the current config
        from tasks.runner import compute_keys
        from tasks.stages import STAGES

        stage, key = ref, compute_keys(cfg, STAGES, wd)[ref][0]
    else:
        stage, key = store.find(ref)
    print(format_lineage(lineage(store, stage, key)))
    return 0


@dataclass
class RunRecord:
    """What a ``--run`` argument points at: the finetune model folder (``<artifact>/model`` or a plain
    model folder), and where the store knows it, the store, the finetune key and the run summary."""

    model_dir: Path
    store: Any = None  # storage.ArtifactStore
    finetune_key: str | None = None
    summary: dict | None = None


def resolve_run(run: Path) -> RunRecord:
    """``run`` as ``perceptio infer --run`` / ``perceptio export --run`` take it: a run folder
    (``<workdir>/runs/<id>``, read from its summary.json), a workdir (its latest run that has a
    finetune stage), or a model folder (a finetune artifact ``<store>/finetune/<key>``, its
    ``model/``, or any saved model folder)."""
    from storage import ArtifactStore, StoreError

    run = Path(run).expanduser().resolve()
    if (run / "model" / "config.json").exists() or (run / "config.json").exists():
        for art in (run, run.parent):  # a finetune artifact of a local store, or its model/
            if (art / "manifest.json").is_file() and art.parent.name == "finetune":
                return RunRecord(run, ArtifactStore(art.parent.parent), art.name)
        return RunRecord(run)
    summaries = [run / "summary.json"] if (run / "summary.json").exists() else sorted(
        (run / "runs").glob("*/summary.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for sp in summaries:
        try:
            summary = json.loads(sp.read_text())
            stages = summary.get("stages", {})
            key = stages["finetune"]["key"] if "finetune" in stages else None
            wd_then, store_then = str(summary["workdir"]), str(summary["store"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            print(f"perceptio: skipping {sp}: not a readable run summary ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        if key is None:
            continue
        wd = sp.parent.parent.parent  # <workdir>/runs/<id>/summary.json: the workdir where it is now
        # the workdir's own store follows the workdir when it is copied or moved; a store named by
        # run.store (a URL elsewhere) is used as it was
        url = str(wd / "store") if store_then == str(Path(wd_then) / "store") else store_then
        store = ArtifactStore(url, cache_dir=wd / "cache")
        if store.trust("finetune", key) is None:
            raise StoreError(f"run {sp.parent}: its model (finetune/{key}) is not in the store {store.url} "
                             "(deleted, or damaged and moved aside); run the pipeline again to make it")
        return RunRecord(store.dir("finetune", key), store, key, summary)
    raise FileNotFoundError(f"no trained model under {run} (a run folder, a workdir or a model folder)")


def resolve_run_model(run: Path) -> Path:
    """The finetune artifact (or model folder) of ``run`` (see :func:`resolve_run`)."""
    return resolve_run(run).model_dir


def run_metrics(rec: RunRecord) -> dict[str, Any]:
    """The run's metrics of the model: the finetune artifact's (``finetune.*``) and those of the
    evaluate artifact made from it (``evaluate.*``: the run summary's evaluate stage, else the
    newest evaluate artifact of the store whose input is this finetune key), flattened as
    summary.json names them. Empty without a store."""
    from tasks.runner import flatten

    if rec.store is None:
        return {}
    store, key = rec.store, rec.finetune_key
    out = {f"finetune.{k}": v for k, v in flatten(store.manifest("finetune", key).metrics).items()}
    ev = None
    stage = (rec.summary or {}).get("stages", {}).get("evaluate")
    if stage and store.has("evaluate", stage["key"]):
        m = store.manifest("evaluate", stage["key"])
        ev = m if m.inputs.get("finetune") == key else None
    if ev is None:
        made = [m for m in (store.manifest("evaluate", k) for k in store.keys("evaluate"))
                if m.inputs.get("finetune") == key]  # fmt: skip
        ev = max(made, key=lambda m: m.created_at) if made else None
    if ev is not None:
        metrics = ev.metrics
        if "metrics.json" in ev.files:
            metrics = json.loads(store.path("evaluate", ev.key, "metrics.json").read_text())
        out.update({f"evaluate.{k}": v for k, v in flatten(metrics).items()})
    return out


def lineage_rows(store: Any, stage: str, key: str) -> list[dict[str, Any]]:
    """The artifact (stage, key) and everything upstream of it, one row each (first seen, depth
    first; an artifact several others read is listed once): stage, key, config and code digests,
    git commit, run id, upstream ``stage/key`` list, store URL, and ``missing`` for one the store
    no longer holds."""
    from storage import lineage

    rows: dict[tuple[str, str], dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if (node.stage, node.key) in rows:
            return
        rows[(node.stage, node.key)] = {
            "stage": node.stage, "key": node.key, "config_digest": node.config_digest,
            "code_digest": node.code_digest, "git_commit": node.git_commit,
            "run_id": node.produced_by.get("run_id"), "inputs": [f"{p.stage}/{p.key}" for p in node.parents],
            "url": node.url, "missing": node.missing,
        }  # fmt: skip
        for p in node.parents:
            walk(p)

    walk(lineage(store, stage, key))
    return list(rows.values())


def _cmd_infer(args: argparse.Namespace) -> int:
    from perceptio_core.data.image_io import ImageError
    from perceptio_core.evaluation.infer import infer
    from perceptio_core.model.export import ExportError

    if args.run is not None:
        from perceptio_core.config import WORKDIR_RECORD, remembered_profile

        rec = remembered_profile(args.run)  # a workdir: say which profile its runs were made with
        if rec is not None:
            sets = " ".join(f"--set {o}" for o in rec[1]) or "no overrides"
            print(f"perceptio: workdir of profile {rec[0]}, {sets} (remembered in "
                  f"{Path(args.run) / WORKDIR_RECORD})", file=sys.stderr)
    if args.queries is None and args.query is None:
        print("perceptio: error: --image needs --query (or give --queries FILE.jsonl, one query a line)",
              file=sys.stderr)
        return 2
    if args.queries is not None and args.query is not None:
        print("perceptio: error: --queries FILE.jsonl names a query on each line; --query goes with --image",
              file=sys.stderr)
        return 2
    model_dir = Path(args.model) if args.model is not None else resolve_run_model(Path(args.run))
    template = None if args.template == "none" else args.template
    if args.queries is not None or Path(args.image).is_dir():
        return _infer_batch(args, model_dir, template)
    try:
        res = infer(model_dir, args.image, args.query, args.out, template=template,
                    max_new_tokens=args.max_new_tokens, constrained=not args.unconstrained,
                    device=args.device)
    except (ImageError, ExportError) as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2
    print(f"answer: {res.answer}")
    print(f"perception block: {res.status}")
    for label, path in (("mask", res.mask_png), ("overlay", res.overlay_png), ("depth", res.depth_png),
                        ("result", res.result_json)):
        if path is not None:
            print(f"{label}: {path}")
    return 0


def _infer_batch(args: argparse.Namespace, model_dir: Path, template: str | None) -> int:
    """``perceptio infer`` over a folder of images (``--image DIR``, the one ``--query``) or a JSONL
    file (``--queries``): the model loaded once, one line a query, ``<out>/results.jsonl``. Exit 0
    when every query was answered, 1 when some were not (their entries say why), 2 when there is
    nothing to answer or no model."""
    from perceptio_core.evaluation.infer import folder_queries, infer_batch, read_queries
    from perceptio_core.model.export import ExportError

    if args.queries is not None:
        queries = read_queries(args.queries, template=template)
        source = args.queries
    else:
        queries = folder_queries(args.image, args.query, template=template)
        source = f"{args.image} (no file named *.jpg, *.png, *.webp, ...)"
    if not queries:
        print(f"perceptio: error: nothing to answer in {source}", file=sys.stderr)
        return 2

    def show(e: dict[str, Any]) -> None:
        if e["error"]:
            print(f"{e['line']}: error: {e['error']}")
        else:
            print(f"{e['line']}: {e['answer']!r} (perception block: {e['status']}) -> {e['out']}")

    try:
        entries = infer_batch(model_dir, queries, args.out, max_new_tokens=args.max_new_tokens,
                              constrained=not args.unconstrained, device=args.device, on_result=show)
    except ExportError as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2
    failed = sum(e["error"] is not None for e in entries)
    print(f"{len(entries) - failed} answered, {failed} failed; results: {Path(args.out) / 'results.jsonl'}")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """``perceptio demo``: the model of ``--run`` / ``--model`` behind a local web page (flows/demo.py);
    exit 2 with the install line when Gradio (the ``demo`` extra) is missing."""
    try:
        import gradio  # noqa: F401  (the optional extra; imported here only, not by --help)
    except ImportError:
        print('perceptio: error: the demo needs Gradio, an optional extra: pip install -e ".[demo]"',
              file=sys.stderr)
        return 2
    from flows.demo import serve
    from perceptio_core.model.export import ExportError

    model_dir = Path(args.model) if args.model is not None else resolve_run_model(Path(args.run))
    try:
        return serve(model_dir, host=args.host, port=args.port, out_dir=args.out, device=args.device,
                     max_new_tokens=args.max_new_tokens, constrained=not args.unconstrained)
    except ExportError as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2


def _cmd_export(args: argparse.Namespace) -> int:
    from perceptio_core.evaluation.infer import resolve_model_dir
    from perceptio_core.model.export import ExportError, export_model

    rec = resolve_run(Path(args.run))
    model_dir = resolve_model_dir(rec.model_dir)
    source: dict[str, Any] = {}
    config = lineage = None
    if rec.store is not None:
        ft = rec.store.manifest("finetune", rec.finetune_key)
        source = {"store": rec.store.url, "finetune_key": rec.finetune_key, "finetune_url": ft.url,
                  "run_id": ft.produced_by.get("run_id")}  # fmt: skip
        if rec.summary is not None:
            source["summary_run_id"] = rec.summary.get("run_id")
        config = ft.config or None
        lineage = lineage_rows(rec.store, "finetune", rec.finetune_key)
    try:
        res = export_model(model_dir, Path(args.out), merge=args.merge, metrics=run_metrics(rec),
                           lineage=lineage, config=config, source=source, overwrite=args.force,
                           check_reload=not args.no_reload_check)  # fmt: skip
    except (ExportError, FileExistsError) as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2
    print(f"exported {model_dir} -> {res.path} ({'LoRA merged' if res.merged else 'base + adapter'}, "
          f"{res.files} files in export.json)")
    if res.check:
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in res.check["outputs"].items())
        print(f"reload check: {diffs} (tolerance {res.check['tolerance']:g})")
    print(f"model card: {res.path / 'model_card.md'}")
    print(f"use: perceptio infer --model {res.path} --image IMG --query TEXT")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from perceptio_core.model.convert import convert_internvl

    try:
        out = convert_internvl(Path(args.src), Path(args.dst), dtype=args.dtype)
    except (ValueError, FileExistsError) as e:
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out} (transformers InternVLForConditionalGeneration layout)")
    print(f"use: --set model.base={out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """Check every artifact of the store (or of one stage) against its manifest, each file's sha256
    included; print each damaged one and what is wrong. ``--quarantine`` moves them aside (the next
    run computes them again; a run does that by itself for what it uses). Exit 1 if any is damaged."""
    store = _store(_config(args))
    if args.stage and args.stage not in _stage_names():
        print(f"perceptio: error: no stage {args.stage!r} (stages: {', '.join(_stage_names())})", file=sys.stderr)
        return 2
    stages = [args.stage] if args.stage else store.stages()
    n = sum(len(store.keys(s)) for s in stages)
    damaged = store.damaged(args.stage)
    for stage, key, why in damaged:
        print(f"DAMAGED {stage}/{key}: {why}")
        if args.quarantine:
            where = store.quarantine(stage, key, why)
            print(f"  moved aside to {where}")
    print(f"store {store.url}: {n} artifact(s) checked ({', '.join(stages) or 'none'}), "
          f"{len(damaged)} damaged")
    return 1 if damaged else 0


def _stage_names() -> list[str]:
    from tasks.stages import BY_NAME

    return list(BY_NAME)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="perceptio", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the pipeline (default profile: offline, CPU, synthetic world)")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--only", default=None, metavar="STAGE", help="run this stage alone")
    g.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help="run this stage and everything downstream of it")
    p.set_defaults(fn=_cmd_run)
    p = sub.add_parser("ablate", help="the paper's ablations: each variant fine-tuned and evaluated, one table")
    _common(p)
    p.add_argument("--variants", default=None, metavar="V1,V2",
                   help="variants beside the full model (default: no_depth,no_seg,no_rec,no_dtok)")
    p.set_defaults(fn=_cmd_ablate)
    p = sub.add_parser("stages", help="each stage, its cache key, fresh or stale")
    _common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_stages)
    p = sub.add_parser("synth", help="write the synthetic world in the real on-disk formats")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.set_defaults(fn=_cmd_synth)
    p = sub.add_parser("infer", help="answer a query about an image with a trained run; mask and depth PNGs")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="a run folder, a workdir (its latest run) or a model folder")
    g.add_argument("--model", help="a model folder (an export of perceptio export, or any saved model)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", help="an image, or a folder: every image in it with the one --query")
    g.add_argument("--queries", metavar="FILE.jsonl",
                   help='one {"image": path, "query": text[, "template": name]} a line (paths relative '
                        "to the file's folder); results in <out>/results.jsonl")
    p.add_argument("--query", help="what to segment (with the default template) or a prompt")
    p.add_argument("--out", default="perceptio-infer",
                   help="folder for answer, mask.png, depth.png (many queries: <out>/<line>/ and results.jsonl)")
    p.add_argument("--template", default="refer_seg",
                   choices=["refer_seg", "semantic_seg", "depth_cot", "instruct", "none"],
                   help="prompt template the query fills (none: the query is the prompt)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--unconstrained", action="store_true", help="no constrained perception decoding")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_infer)
    p = sub.add_parser("demo", help="a local web page (Gradio): drop an image, ask, see the answer, mask and depth")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="a run folder, a workdir (its latest run) or a model folder")
    g.add_argument("--model", help="a model folder (an export of perceptio export, or any saved model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    p.add_argument("--out", default=None, help="folder for the answers' files (default: a temporary folder)")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--unconstrained", action="store_true", help="no constrained perception decoding")
    p.add_argument("--device", default="cpu")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("export", help="a self-contained model folder from a trained run (model card, manifest)")
    p.add_argument("--run", required=True, help="a run folder, a workdir (its latest run) or a model folder")
    p.add_argument("--out", required=True, help="the export folder (must not exist, unless --force)")
    p.add_argument("--merge", action="store_true", help="merge LoRA into the base weights (no adapter)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-reload-check", action="store_true",
                   help="check the written files against the manifest only, without reloading the export")
    p.set_defaults(fn=_cmd_export)
    p = sub.add_parser("convert-internvl",
                       help="convert an InternVL in OpenGVLab's own layout (InternVLChatModel) to the transformers one")
    p.add_argument("src", help="the OpenGVLab checkpoint folder (config.json + safetensors + tokenizer)")
    p.add_argument("dst", help="the new folder (must not exist or be empty)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype of the output (default: the source's)")
    p.set_defaults(fn=_cmd_convert)
    p = sub.add_parser("lineage", help="an artifact's upstream chain, from the store alone")
    p.add_argument("artifact", help="a stage name, stage/key, a key prefix, or a store URL")
    _common(p)
    p.set_defaults(fn=_cmd_lineage)
    p = sub.add_parser("verify", help="check every artifact's files against its manifest (sizes and sha256)")
    p.add_argument("stage", nargs="?", default=None, help="one stage only (default: the whole store)")
    p.add_argument("--quarantine", action="store_true", help="move each damaged artifact aside (it is recomputed)")
    _common(p)
    p.set_defaults(fn=_cmd_verify)
    return ap


_PREFECT_SERVER_KEYS = ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                        "PREFECT_API_DATABASE_CONNECTION_URL")  # fmt: skip
"""Settings by which a user names their own Prefect server (or its database): any one of them set,
and the CLI leaves Prefect's home alone."""


def _dotenv(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a ``.env`` file (Prefect reads the one of the current folder)."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            line = line.strip().removeprefix("export ").strip()
            if "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip().strip("'\"")
    return out


def _toml(path: Path, *keys: str) -> dict[str, Any]:
    """The table at ``keys`` of the TOML file ``path`` ({} when the file or the table is missing)."""
    import tomllib

    try:
        data: Any = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    for k in keys:
        data = data.get(k, {}) if isinstance(data, dict) else {}
    return data if isinstance(data, dict) else {}


def prefect_profiles_path(env: Mapping[str, str]) -> Path:
    """The profiles.toml Prefect 3 reads (its ``settings.sources._get_profiles_path``):
    PREFECT_PROFILES_PATH, else ``$PREFECT_HOME/profiles.toml``, else ``~/.prefect/profiles.toml``."""
    if env.get("PREFECT_PROFILES_PATH"):
        return Path(env["PREFECT_PROFILES_PATH"]).expanduser()
    home = Path(env["PREFECT_HOME"]).expanduser() if env.get("PREFECT_HOME") else Path.home() / ".prefect"
    return home / "profiles.toml"


def configured_prefect_server(env: Mapping[str, str], cwd: Path) -> str | None:
    """Where the user names a Prefect server (an API URL) or a server database, as Prefect 3 would
    find it: the environment, ``./.env``, ``./prefect.toml`` (``[api] url``,
    ``[server.database] connection_url``), ``./pyproject.toml`` (``[tool.prefect...]``), then the
    active profile of profiles.toml (PREFECT_PROFILE, else its ``active``). None when nowhere."""
    for where, values in (("the environment", env), (str(cwd / ".env"), _dotenv(cwd / ".env"))):
        for k in _PREFECT_SERVER_KEYS:
            if values.get(k):
                return f"{k} in {where}"
    for path, base in ((cwd / "prefect.toml", ()), (cwd / "pyproject.toml", ("tool", "prefect"))):
        if _toml(path, *base, "api").get("url") or _toml(path, *base, "server", "database").get("connection_url"):
            return str(path)
    path = prefect_profiles_path(env)
    profiles = _toml(path, "profiles")
    name = env.get("PREFECT_PROFILE") or _toml(path).get("active")
    profile = profiles.get(name, {}) if isinstance(name, str) else {}
    for k in _PREFECT_SERVER_KEYS:
        if isinstance(profile, dict) and profile.get(k):
            return f"{k} in profile {name!r} of {path}"
    return None


def use_workdir_prefect_home(workdir: Path, env: MutableMapping[str, str] | None = None) -> Path | None:
    """Give Prefect's temporary server a home of the run's own, ``<workdir>/prefect`` (its database
    ``prefect.db`` there, not the ``~/.prefect/prefect.db`` every other run of the machine shares),
    by setting PREFECT_HOME in ``env`` (default ``os.environ``; call before Prefect is imported).

    Nothing changes when PREFECT_HOME is set already, or the user names a server or its database
    (:func:`configured_prefect_server`). The user's profiles.toml stays the one Prefect reads
    (PREFECT_PROFILES_PATH), so their other settings still apply. Returns the home set, or None."""
    env = os.environ if env is None else env
    if env.get("PREFECT_HOME") or configured_prefect_server(env, Path.cwd()):
        return None
    profiles = prefect_profiles_path(env)
    home = Path(workdir).expanduser().resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env["PREFECT_HOME"] = str(home)
    if profiles.is_file():
        env.setdefault("PREFECT_PROFILES_PATH", str(profiles))
    return home


def _prepare_prefect(args: argparse.Namespace) -> None:
    """Before ``perceptio run`` imports Prefect: the run's own Prefect home where the user has no
    server (:func:`use_workdir_prefect_home`), and one line saying where its database is."""
    home = use_workdir_prefect_home(Path(_config(args).run.workdir))
    if home is not None:
        print(f"perceptio: this run's Prefect database is {home / 'prefect.db'}; browse it afterwards with "
              f"`PREFECT_HOME={home} prefect server start`", file=sys.stderr)


def _interruptible(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``args.fn`` so that Ctrl-C or SIGTERM (a cluster scheduler's stop) ends it within
    seconds and cleanly: the pipeline writes its summary with the cut stage ``interrupted``
    (flows/pipeline.py), the finished stages and the cut stage's durable chunks stay, and one line
    says how to resume; exit status 128 + the signal (130, 143). Prefect turns SIGTERM into its
    ``TerminationSignal`` during a flow and sends it again to this handler after the flow ended."""
    import shlex
    import signal

    got: list[int] = []

    def stop(signum: int, _frame: Any) -> None:
        got.append(signum)
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        signum = got[0] if got else signal.SIGINT
        print(f"perceptio: interrupted ({signal.Signals(signum).name}); the finished stages are in the store and "
              f"the cut stage resumes from its last durable chunk: run `perceptio {shlex.join(argv)}` again",
              file=sys.stderr)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    from perceptio_core.device import cpu_thread_env

    cpu_thread_env()  # before torch loads: half the cores, passive OpenMP waits (an export wins)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect's temporary server must come up within this; its 20 s default is not met on a loaded
    # 2-core machine (an export of the variable wins)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # the temporary offline server sends no telemetry (it logged "Failed to send telemetry" every
    # few minutes on a machine without internet); an export of the variable wins
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "workdir") and hasattr(args, "overrides"):  # the commands of _common
            line = use_workdir_profile(args)
            if line:
                print(line, file=sys.stderr)
        if args.cmd in ("run", "ablate"):
            _prepare_prefect(args)
            return _interruptible(args, sys.argv[1:] if argv is None else argv)
        return args.fn(args)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        print(f"perceptio: error: {e}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """What the CLI reports as a one-line error (exit 2): a config error, a missing file, a store
    error, a pipeline error. The latter two only where their modules were imported (an exception
    class never loaded cannot have been raised), so that reporting one imports nothing."""
    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, name in (("storage.store", "StoreError"), ("tasks.runner", "PipelineError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


if __name__ == "__main__":
    sys.exit(main())
