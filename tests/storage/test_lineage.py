"""Lineage from the store alone (``perceptio lineage``): each artifact once, the asked one first and
each before the artifacts it was made from, with its parents named and its URL where the store
read has it now."""

import shutil

from storage import ArtifactStore, Manifest
from storage.lineage import format_lineage, lineage, lineage_order

# the upstream part of the pipeline's DAG that ``curate`` reads: ``sources`` is read by four of them
INPUTS = {
    "sources": {},
    "fit_teacher": {"sources": "s1"},
    "teacher_depth": {"sources": "s1", "fit_teacher": "f1"},
    "train_vqvae": {"sources": "s1", "teacher_depth": "t1"},
    "tokenize_depth": {"teacher_depth": "t1", "train_vqvae": "v1"},
    "curate": {"sources": "s1", "teacher_depth": "t1", "train_vqvae": "v1", "tokenize_depth": "k1"},
}
KEYS = {"sources": "s1", "fit_teacher": "f1", "teacher_depth": "t1", "train_vqvae": "v1", "tokenize_depth": "k1",
        "curate": "c1"}  # fmt: skip


def _store(root):
    store = ArtifactStore(root)
    for stage, inputs in INPUTS.items():
        w = store.writer(stage, KEYS[stage])
        with w.atomic("x") as f:
            f.write(stage.encode())
        w.commit(Manifest(stage=stage, key=KEYS[stage], url="", inputs=inputs,
                          produced_by={"run_id": "r1"}))  # fmt: skip
    return store


def test_each_artifact_once_in_topological_order_with_its_parents(tmp_path):
    store = _store(tmp_path / "store")
    text = format_lineage(lineage(store, "curate", "c1"))
    lines = text.splitlines()
    heads = [ln.split()[0] for ln in lines if not ln.startswith(" ")]
    # once each (the tree printed ``sources`` once per path to it: six times for curate)
    assert sorted(heads) == sorted(f"{s}/{k}" for s, k in KEYS.items())
    assert text.count("sources/s1  config") == 1 and text.count(store.artifact_url("sources", "s1")) == 1
    # the asked artifact first, every artifact before those it was made from
    pos = {h.split("/")[0]: i for i, h in enumerate(heads)}
    assert heads[0] == "curate/c1" and heads[-1] == "sources/s1"
    assert all(pos[s] < pos[p] for s, ins in INPUTS.items() for p in ins)
    # each with its URL, then its parents named, one ``<-`` line each
    block = text.split("curate/c1  config")[1].splitlines()[1:6]
    assert block == [f"    {store.artifact_url('curate', 'c1')}",
                     *(f"    <- {p}/{k}" for p, k in sorted(INPUTS["curate"].items()))]


def test_shared_manifests_are_read_once(tmp_path, monkeypatch):
    store = _store(tmp_path / "store")
    reads = []
    real = ArtifactStore.manifest
    monkeypatch.setattr(ArtifactStore, "manifest", lambda self, s, k: reads.append(s) or real(self, s, k))
    node = lineage(store, "curate", "c1")
    assert sorted(reads) == sorted(KEYS)
    assert [n.stage for n in lineage_order(node)][0] == "curate"


def test_urls_are_the_stores_where_it_is_now(tmp_path):
    """A copied store prints its own location: no path of the store it was made in."""
    _store(tmp_path / "old")
    shutil.copytree(tmp_path / "old", tmp_path / "new")
    shutil.rmtree(tmp_path / "old")
    store = ArtifactStore(tmp_path / "new")
    node = lineage(store, "curate", "c1")
    assert all(n.url.startswith(store.url + "/") for n in lineage_order(node))
    text = format_lineage(node)
    assert str(tmp_path / "old") not in text and text.count(store.url) == len(KEYS)


def test_an_artifact_gone_from_the_store_is_named_not_raised(tmp_path):
    store = _store(tmp_path / "store")
    shutil.rmtree(tmp_path / "store" / "fit_teacher" / "f1")
    text = format_lineage(lineage(store, "teacher_depth", "t1"))
    assert "fit_teacher/f1  (not in this store)" in text
    assert "    <- fit_teacher/f1  (not in this store)" in text and "    <- sources/s1" in text
