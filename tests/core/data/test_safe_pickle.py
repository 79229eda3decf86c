"""safe_load refuses every global: a malicious pickle cannot run code; plain data loads."""

from __future__ import annotations

import collections
import os
import pickle

import pytest

from perceptio_core.data.safe_pickle import PickleReadError, UnsafePickleError, safe_load


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 0}, _Evil(str(target))], protocol=2))
    with pytest.raises(UnsafePickleError) as exc:
        safe_load(bad)
    msg = str(exc.value)
    assert str(bad) in msg
    assert "system" in msg and ("posix" in msg or "os" in msg or "nt" in msg)
    assert not target.exists()
    # the same from bytes, named
    with pytest.raises(UnsafePickleError, match="upload.p"):
        safe_load(bad.read_bytes(), name="upload.p")
    assert not target.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_any_global_is_refused(protocol):
    data = pickle.dumps({"x": collections.OrderedDict(a=1)}, protocol=protocol)
    with pytest.raises(UnsafePickleError, match=r"refused global 'collections\.OrderedDict'"):
        safe_load(data)


def test_persistent_id_is_refused():
    data = b"\x80\x02Pabc\n."  # PERSID
    with pytest.raises(UnsafePickleError, match="persistent"):
        safe_load(data)


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_plain_refer_data_loads(protocol):
    refs = [{"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000001_7.jpg", "ann_id": 7,
             "ref_id": 0, "image_id": 1, "split": "train", "category_id": 1,
             "sentences": [{"tokens": ["red", "ball"], "raw": "Red ball", "sent_id": 0,
                            "sent": "red ball"}, {"tokens": [], "raw": "", "sent_id": 1, "sent": ""}],
             "score": 0.5, "ok": True, "none": None, "pair": (1, 2)}]
    assert safe_load(pickle.dumps(refs, protocol=protocol)) == refs


def test_python2_byte_strings_decode():
    assert safe_load(b"\x80\x02U\x05caf\xc3\xa9.") == "caf\u00e9"  # UTF-8 bytes
    # a byte that is not UTF-8 spoils only its own string (kept as a lone surrogate for the reader
    # to quarantine), never the whole file as Latin-1
    assert safe_load(b"\x80\x02U\x04caf\xe9.") == "caf\udce9"
    assert safe_load(b"(lS'caf\\xe9'\naS'ok\\xc3\\xa9'\na.") == ["caf\udce9", "ok\u00e9"]


def test_corrupt_pickle(tmp_path):
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([{"a": 1}] * 10, protocol=2)[:-7])
    with pytest.raises(PickleReadError, match="refs"):
        safe_load(p)
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "absent.p")
