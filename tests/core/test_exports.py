import perceptio_core


def test_every_public_name_resolves():
    for name in perceptio_core.__all__:
        assert getattr(perceptio_core, name) is not None, name
    assert perceptio_core.SEG == "[SEG]"
