"""The summary a run prints leads with each stage's headline figures, beside the base's."""

from flows.pipeline import headline, summary_table


def test_headline_figures_in_order_beside_the_base():
    metrics = {"base": {"refcoco": {"val": {"ciou": 0.05}}, "hardblink": {"mean": {"accuracy": 0.375}}},
               "hardblink": {"3": {"accuracy": 0.5, "n": 24.0}, "mean": {"accuracy": 0.319}},
               "refcoco": {"val": {"ciou": 0.2687, "giou": 0.2}}, "refcoco+": {"val": {"ciou": 0.337}},
               "mcq": {"mmbench": {"accuracy": 0.283, "n": 120.0}, "seed": {"accuracy": 0.4}},
               "mme": {"perception": {"score": 112.5}}}
    assert headline("evaluate", metrics) == [
        "RefCOCO val cIoU 0.269 (base 0.05)", "RefCOCO+ val cIoU 0.337", "HardBLINK mean 0.319 (base 0.375)",
        "MCQ mmbench 0.283", "MCQ seed 0.4", "MME perception 112"]
    assert headline("curate", {"samples_total": 2043, "tasks": {"refer_seg": 10}}) == ["samples 2043"]
    assert headline("unknown_stage", {"x": 1.0}) == []


def test_summary_table_shows_headlines_not_alphabetical_metrics():
    summary = {"run_id": "r", "wall_s": 1.0, "store": "/s", "stages": {
        "evaluate": {"status": "computed", "key": "k", "wall_s": 2.0, "quarantine": {"count": 0},
                     "metrics": {"base": {"hardblink": {"3": {"accuracy": 0.0, "n": 1.0}}},
                                 "hardblink": {"mean": {"accuracy": 0.25}}}}}}
    line = summary_table(summary).splitlines()[-1]
    assert line.endswith("HardBLINK mean 0.25") and "base.hardblink.3" not in line
