"""Scene sampling is deterministic, and the entity view is true to the render."""

from __future__ import annotations

import numpy as np

from perceptio_core.world.render import LABEL_OBJECT0, render
from perceptio_core.world.scenes import COLOURS, entities, sample_scene


def test_same_generator_same_scene():
    a = sample_scene(np.random.default_rng([0, 1]), 64, 48, 2, 6, crowd=True)
    b = sample_scene(np.random.default_rng([0, 1]), 64, 48, 2, 6, crowd=True)
    c = sample_scene(np.random.default_rng([0, 2]), 64, 48, 2, 6, crowd=True)
    assert a == b and a != c


def test_entities_are_the_visible_objects_of_the_render():
    crowds = 0
    for seed in range(6):
        rng = np.random.default_rng([seed, 7])
        scene = sample_scene(rng, 64, 48, 2, 6, crowd=True)
        r = render(scene, rng)
        ents = entities(scene, r)
        seen = {int(v) - LABEL_OBJECT0 for v in np.unique(r.label) if v >= LABEL_OBJECT0}
        assert [e.k for e in ents] == sorted(seen)
        for e in ents:
            obj = scene.objects[e.k]
            assert (e.shape, e.color, e.size, e.group) == (obj.shape, obj.color, obj.size, obj.group)
            assert e.color in COLOURS
            ys, xs = np.nonzero(r.label == LABEL_OBJECT0 + e.k)
            assert e.visible == len(xs) and 0 < e.fraction <= 1
            assert (e.cx, e.cy) == (xs.mean() + 0.5, ys.mean() + 0.5)
            assert e.depth > 1.0
        members = [e for e in ents if e.group >= 0]
        crowds += bool(members)
        # a crowd is small objects of one colour and shape
        assert len({(e.color, e.shape, e.size) for e in members}) <= 1
        assert all(e.size == "small" for e in members)
    assert crowds
