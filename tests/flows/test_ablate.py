"""The ablation variants share every stage they do not change (paper §4.2, issue 20)."""

from perceptio_core.evaluation.ablation import DEFAULT_VARIANTS, variant_overrides
from perceptio_core.config import load_config
from tasks.runner import compute_keys
from tasks.stages import STAGES

SHARED = {"sources", "benchmarks", "fit_teacher", "teacher_depth", "train_vqvae", "tokenize_depth", "base", "fit_sam2"}


def test_variants_change_the_keys_of_the_stages_they_change_and_no_other(tmp_path):
    full_cfg = load_config("smoke")
    keys = {}
    for v in ("full", *DEFAULT_VARIANTS):
        cfg = load_config("smoke", variant_overrides(full_cfg, v))
        keys[v] = {s: k for s, (k, _) in compute_keys(cfg, STAGES, tmp_path).items()}
    for v in DEFAULT_VARIANTS:
        changed = {s for s in keys["full"] if keys[v][s] != keys["full"][s]}
        curation = {"curate"} if v in ("no_depth", "no_seg") else set()
        assert changed == curation | {"finetune", "evaluate"}, v
        assert not changed & SHARED
    # each variant is a model of its own
    assert len({keys[v]["finetune"] for v in keys}) == len(keys)
