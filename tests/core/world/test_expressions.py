"""The world's words on a hand-made scene: two red balls side by side and a big blue box behind."""

from __future__ import annotations

import numpy as np
import pytest

from perceptio_core.world.expressions import SHAPE_WORDS, candidates, vqa_questions
from perceptio_core.world.scenes import Entity

WIDTH = 100
LEFT_BALL = Entity(0, "ball", "red", "small", -1, 100, 100, cx=20.0, cy=50.0, depth=5.0)
RIGHT_BALL = Entity(1, "ball", "red", "small", -1, 100, 100, cx=80.0, cy=50.0, depth=5.1)
BOX = Entity(2, "box", "blue", "large", -1, 100, 100, cx=50.0, cy=40.0, depth=10.0)
ENTS = [LEFT_BALL, RIGHT_BALL, BOX]
LOCATION_WORDS = {"left", "right", "leftmost", "rightmost", "closest", "nearest", "front",
                  "farthest", "back", "furthest", "behind"}


@pytest.mark.parametrize("seed", range(8))
def test_twins_are_told_apart_by_location_only(seed):
    rng = np.random.default_rng(seed)
    left = candidates(LEFT_BALL, ENTS, "refcoco", WIDTH, rng)
    right = candidates(RIGHT_BALL, ENTS, "refcoco", WIDTH, rng)
    assert left and all("left" in c and "right" not in c for c in left)
    assert right and all("right" in c and "left" not in c for c in right)
    # nearly the same depth: neither is "the nearest"
    assert not any(w in c for c in left + right for w in ("closest", "nearest", "front"))
    # without location words nothing tells the twins apart (both small, both red balls)
    assert candidates(LEFT_BALL, ENTS, "refcoco+", WIDTH, rng) == []
    longer = candidates(LEFT_BALL, ENTS, "refcocog", WIDTH, rng)
    assert longer and all(c.startswith(("the red ", "a red ")) and "left" in c for c in longer)


@pytest.mark.parametrize("seed", range(8))
def test_a_unique_object_is_named_in_every_style(seed):
    rng = np.random.default_rng(seed)
    plus = candidates(BOX, ENTS, "refcoco+", WIDTH, rng)
    assert plus and not any(LOCATION_WORDS & set(c.split()) for c in plus)
    assert any(c.split()[-1] in SHAPE_WORDS["box"] for c in plus)
    longer = candidates(BOX, ENTS, "refcocog", WIDTH, rng)
    assert longer and all(c.split()[1] == "blue" and c.split()[2] in SHAPE_WORDS["box"] for c in longer)


def test_questions_are_answered_by_the_scene():
    qs = {q["question"]: q for q in vqa_questions(ENTS, WIDTH, np.random.default_rng(0))}
    answer = {k: q["options"]["ABCD".index(q["answer"])] for k, q in qs.items()}
    assert answer["How many objects are there in the image?"] == "3"
    assert answer["What colour is the box?"] == "blue"
    assert answer["What shape is the blue object?"] == "box"
    assert "What colour is the ball?" not in qs and "What shape is the red object?" not in qs
    for q in qs.values():
        assert 2 <= len(q["options"]) <= 4 and len(set(q["options"])) == len(q["options"])
