"""The ablation variants as configuration, their losses, and the comparison table (paper §4.2)."""

import json
import math

import pytest
import torch

from perceptio_core.evaluation.ablation import (
    FULL, ablation_table, parse_variants, table_json, table_markdown, variant_overrides,
)
from perceptio_core.config import load_config
from perceptio_core.evaluation.stats import wilson_interval
from perceptio_core.model.losses import total_loss

TERMS = ("llm", "seg_bce", "seg_dice", "marker", "token", "count", "rec")


def _cfg(variant):
    base = load_config("smoke")
    return load_config("smoke", variant_overrides(base, variant))


def test_each_variant_is_what_the_paper_removes():
    full = load_config("smoke")
    assert variant_overrides(full, FULL) == []
    nd, ns, nr, nk = (_cfg(v) for v in ("no_depth", "no_seg", "no_rec", "no_dtok"))
    assert nd.curate.perception == ["seg"] and "depth_cot" not in nd.curate.tasks
    assert (nd.loss.w_dtok, nd.loss.w_rec, nd.loss.w_seg) == (0, 0, full.loss.w_seg)
    assert ns.curate.perception == ["depth"] and not {"semantic_seg", "grounded_conv"} & set(ns.curate.tasks)
    assert "refer_seg" in ns.curate.tasks and "depth_cot" in ns.curate.tasks
    assert (ns.loss.w_seg, ns.loss.w_dtok, ns.loss.w_rec) == (0, full.loss.w_dtok, full.loss.w_rec)
    assert (nr.loss.w_rec, nr.loss.w_dtok, nr.curate) == (0, full.loss.w_dtok, full.curate)
    assert (nk.loss.w_dtok, nk.loss.w_rec, nk.curate) == (0, full.loss.w_rec, full.curate)
    with pytest.raises(ValueError, match="no_colour"):
        variant_overrides(full, "no_colour")
    assert parse_variants("no_seg, no_rec,no_seg") == ["full", "no_seg", "no_rec"]
    assert parse_variants(None) == ["full", "no_depth", "no_seg", "no_rec", "no_dtok"]


@pytest.mark.parametrize("variant, silent", [("no_rec", {"rec"}), ("no_dtok", {"marker", "token", "count"}),
                                             ("no_depth", {"marker", "token", "count", "rec"}),
                                             ("no_seg", {"seg_bce", "seg_dice"}), (FULL, set())])
def test_a_variant_gives_its_removed_terms_zero_gradient(variant, silent):
    terms = {k: torch.tensor(0.5 + i / 10, requires_grad=True) for i, k in enumerate(TERMS)}
    total_loss(terms, _cfg(variant).loss).backward()
    for k, t in terms.items():
        assert (t.grad.item() == 0.0) is (k in silent), k


def test_table_golden_numbers():
    # HardBLINK 3 points: full right on 8 of 10, no_depth on 5 of the same 10 (3 flips, paired)
    full_hb = [1] * 8 + [0] * 2
    nd_hb = [1] * 5 + [0] * 5
    iou_full = [[5, 10], [10, 10]]  # cIoU = 15 / 20
    iou_nd = [[2, 10], [8, 10]]  # cIoU = 10 / 20
    samples = {FULL: {"hardblink.3.accuracy": full_hb, "refcoco.val.iou": iou_full, "mcq.mmbench.accuracy": [1, 0]},
               "no_depth": {"hardblink.3.accuracy": nd_hb, "refcoco.val.iou": iou_nd, "mcq.mmbench.accuracy": [1, 1]}}
    rows = ablation_table(samples, n_boot=200)
    assert [(r.group, r.label) for r in rows] == [("HardBLINK", "3 points"), ("Referring segmentation", "refcoco.val cIoU"),
                                                 ("Multiple choice", "mmbench")]
    hb, ref, mc = rows
    assert hb.values[FULL].value == 0.8 and hb.values["no_depth"].value == 0.5
    assert (hb.values[FULL].lo, hb.values[FULL].hi) == pytest.approx(wilson_interval(8, 10))
    assert hb.differences["no_depth"].value == pytest.approx(-0.3) and hb.differences["no_depth"].n == 10
    assert ref.values[FULL].value == pytest.approx(0.75) and ref.values["no_depth"].value == pytest.approx(0.5)
    assert ref.differences["no_depth"].value == pytest.approx(-0.25)
    assert mc.differences["no_depth"].value == pytest.approx(0.5)
    md = table_markdown(rows, [FULL, "no_depth"])
    assert "| HardBLINK | 3 points | 10 | 0.800 (" in md and "-0.300 (" in md
    data = json.loads(table_json(rows, [FULL, "no_depth"], {"no_depth": {"overrides": ["loss.w_rec=0"]}}))
    assert data["rows"][0]["differences"]["no_depth"]["value"] == pytest.approx(-0.3)
    assert isinstance(data["rows"][0]["differences"]["no_depth"]["within_noise"], bool)


def test_a_variant_scored_on_other_samples_gets_no_difference():
    rows = ablation_table({FULL: {"hardblink.3.accuracy": [1, 0, 1]}, "no_seg": {"hardblink.3.accuracy": [1, 1]}})
    assert rows[0].values["no_seg"].value == 1.0 and "no_seg" not in rows[0].differences
    assert "| - |" in table_markdown(rows, [FULL, "no_seg"]) or "| - " in table_markdown(rows, [FULL, "no_seg"])
    with pytest.raises(ValueError, match="full model"):
        ablation_table({"no_seg": {}})
    assert math.isnan(ablation_table({FULL: {"hardblink.3.accuracy": []}})[0].values[FULL].value)
