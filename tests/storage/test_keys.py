from storage.keys import code_digest, stage_key


def test_same_inputs_same_key_and_each_input_matters(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    code = code_digest([f])
    k = stage_key("vqvae", code, {"vqvae": {"steps": 10}}, {"teacher_depth": "t1"})
    assert k == stage_key("vqvae", code, {"vqvae": {"steps": 10}}, {"teacher_depth": "t1"})
    assert k != stage_key("vqvae", code, {"vqvae": {"steps": 11}}, {"teacher_depth": "t1"})
    assert k != stage_key("vqvae", code, {"vqvae": {"steps": 10}}, {"teacher_depth": "t2"})
    assert k != stage_key("tokenize", code, {"vqvae": {"steps": 10}}, {"teacher_depth": "t1"})
    f.write_text("x = 2\n")  # same path, changed content: the key changes
    assert k != stage_key("vqvae", code_digest([f]), {"vqvae": {"steps": 10}}, {"teacher_depth": "t1"})
    assert len(k) == 20
