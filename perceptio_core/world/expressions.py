"""The world's words: referring expressions, captions and multiple-choice questions, all true of
the scene they describe (made from its :class:`~perceptio_core.world.scenes.Entity` list).

Referring expressions (SPEC §5) single out one object among everything visible in the image,
crowd members included, in the style of each REFER dataset (:func:`candidates`): RefCOCO uses
colour, shape, left/right and nearest/farthest in short phrases; RefCOCO+ uses no location words at
all (colour, shape and physical size: "big"/"small"); RefCOCOg uses longer sentences that always
name colour and shape, with a true relation to a landmark object or a location clause. Depths
count as different ("nearest", "in front of") when they differ by at least 20 %, horizontal
positions when the centroids are at least ``max(3, 0.06 * width)`` pixels apart.
:func:`dress` types a phrase as annotators do and :func:`sentence` makes REFER's sentence dict.

:func:`captions` lists a scene's objects and their layout, COCO-caption style;
:func:`vqa_questions` asks MMBench-style multiple-choice questions (counting, colour, shape,
depth, spatial relation) and :func:`mme_questions` MME-style yes/no pairs (existence, count,
position, colour), their answers from the scene truth.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from perceptio_core.world.render import SHAPES, Scene
from perceptio_core.world.scenes import COLOURS, Entity

# words an expression may use for each shape (the first is the category name)
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "ball": ("ball", "sphere"),
    "box": ("box", "cube", "block"),
    "cylinder": ("cylinder",),
    "cone": ("cone",),
}
_PLURAL = {"box": "boxes"}

_NEAR_RATIO = 1.2  # "nearest"/"farthest"/"in front of"/"behind": depths differ by at least 20 %

_REL_PHRASES = {
    "left": ("left {np}", "{np} on left", "{np} on the left", "leftmost {np}"),
    "right": ("right {np}", "{np} on right", "{np} on the right", "rightmost {np}"),
    "nearest": ("closest {np}", "nearest {np}", "{np} in front", "front {np}"),
    "farthest": ("farthest {np}", "{np} in back", "{np} furthest away", "back {np}"),
    "big": ("big {np}", "large {np}", "the big {np}"),
    "small": ("small {np}", "little {np}", "the small {np}"),
}


def _matches(e: Entity, color: str | None, shape: str | None) -> bool:
    return (color is None or e.color == color) and (shape is None or e.shape == shape)


def _is_extreme(t: Entity, group: list[Entity], rel: str, width: int) -> bool:
    """Whether ``t`` is clearly the ``rel`` one (left/right/nearest/farthest/big/small) of ``group``."""
    others = [e for e in group if e is not t]
    if not others:
        return False
    margin = max(3.0, 0.06 * width)
    if rel == "left":
        return all(t.cx + margin <= e.cx for e in others)
    if rel == "right":
        return all(t.cx >= e.cx + margin for e in others)
    if rel == "nearest":
        return all(t.depth * _NEAR_RATIO <= e.depth for e in others)
    if rel == "farthest":
        return all(t.depth >= _NEAR_RATIO * e.depth for e in others)
    if rel == "big":
        return t.size == "large" and all(e.size == "small" for e in others)
    if rel == "small":
        return t.size == "small" and all(e.size == "large" for e in others)
    raise ValueError(rel)


def _relation(t: Entity, other: Entity, width: int) -> str | None:
    """A clearly true spatial relation of ``t`` to ``other``, as a phrase, or None."""
    margin = max(3.0, 0.06 * width)
    if t.depth * _NEAR_RATIO <= other.depth:
        return "in front of"
    if t.depth >= _NEAR_RATIO * other.depth:
        return "behind"
    if t.cx + margin <= other.cx:
        return "to the left of"
    if t.cx >= other.cx + margin:
        return "to the right of"
    return None


def _shape_word(shape: str, rng: np.random.Generator) -> str:
    words = SHAPE_WORDS[shape]
    return words[0] if rng.random() < 0.6 else str(rng.choice(words))


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


def _np_phrase(color: str | None, shape: str | None, rng: np.random.Generator) -> str:
    if color and shape:
        return f"{color} {_shape_word(shape, rng)}"
    if shape:
        return _shape_word(shape, rng)
    if color:
        return f"{color} {rng.choice(['one', 'object', 'thing'])}"
    return str(rng.choice(["object", "one"]))


# --------------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------------


def candidates(t: Entity, ents: list[Entity], style: str, width: int,
               rng: np.random.Generator) -> list[str]:
    """Every phrasing in ``style`` ("refcoco", "refcoco+" or "refcocog") that singles out ``t``
    among ``ents``; empty when none does."""
    out: list[str] = []
    if style == "refcocog":
        same = [e for e in ents if _matches(e, t.color, t.shape)]
        shape = _shape_word(t.shape, rng)
        if len(same) == 1:
            marks = [e for e in ents if e is not t and e.group < 0
                     and sum(_matches(o, e.color, e.shape) for o in ents) == 1]
            marks.sort(key=lambda e: abs(e.cx - t.cx))
            for m in marks:
                rel = _relation(t, m, width)
                if rel:
                    lw = _shape_word(m.shape, rng)
                    out += [f"a {t.color} {shape} {rel} the {m.color} {lw}",
                            f"the {t.color} {shape} that is {rel} the {m.color} {lw}"]
                    break
            out += [f"the {t.color} {shape} standing on the ground",
                    f"a {t.color} {shape} sitting on the floor of the scene"]
        else:
            pl = _plural(shape)
            for rel, phrases in (
                ("left", (f"the {t.color} {shape} that is on the left side of the picture",
                          f"a {t.color} {shape} which is further left than the other {t.color} {pl}")),
                ("right", (f"the {t.color} {shape} that is on the right side of the picture",
                           f"a {t.color} {shape} which is further right than the other {t.color} {pl}")),
                ("nearest", (f"the {t.color} {shape} that is closest to the camera",
                             f"a {t.color} {shape} nearer to the viewer than the other {t.color} {pl}")),
                ("farthest", (f"the {t.color} {shape} that is farthest from the camera",
                              f"a {t.color} {shape} further away than the other {t.color} {pl}")),
            ):
                if _is_extreme(t, same, rel, width):
                    out += list(phrases)
        return out
    descs = [(t.color, t.shape), (None, t.shape), (t.color, None), (None, None)]
    rels = ("big", "small") if style == "refcoco+" else ("left", "right", "nearest", "farthest")
    for color, shape in descs:
        group = [e for e in ents if _matches(e, color, shape)]
        if len(group) == 1 and (color or shape):
            np_ = _np_phrase(color, shape, rng)
            out += [np_, f"the {np_}"]
        elif len(group) > 1:
            for rel in rels:
                if _is_extreme(t, group, rel, width):
                    tmpl = str(rng.choice(_REL_PHRASES[rel]))
                    out.append(tmpl.format(np=_np_phrase(color, shape, rng)))
    return out


def sentence(raw: str, sent_id: int) -> dict[str, Any]:
    """A REFER sentence dict: tokens, raw, sent_id, sent."""
    tokens = re.findall(r"[a-z0-9]+", raw.lower())
    return {"tokens": tokens, "raw": raw, "sent_id": sent_id, "sent": " ".join(tokens)}


def dress(text: str, style: str, rng: np.random.Generator) -> str:
    """Raw text as annotators type it: sometimes capitalised; RefCOCOg sentences end with a stop."""
    if rng.random() < 0.4:
        text = text[0].upper() + text[1:]
    if style == "refcocog":
        text = text[0].upper() + text[1:] + "."
    return text


# --------------------------------------------------------------------------------------------
# Captions and questions
# --------------------------------------------------------------------------------------------


def captions(scene: Scene, ents: list[Entity], rng: np.random.Generator) -> list[str]:
    """One or two captions describing the objects and their layout."""
    singles = sorted([e for e in ents if e.group < 0], key=lambda e: e.cx)
    crowd = [e for e in ents if e.group >= 0]
    parts = [f"a {'small ' if e.size == 'small' and rng.random() < 0.4 else ''}{e.color} "
             f"{_shape_word(e.shape, rng)}" for e in singles]
    if crowd:
        parts.append(f"a group of small {crowd[0].color} {_plural(crowd[0].shape)}")
    if not parts:
        parts = ["nothing but an empty floor"]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    caps = [f"{listing[0].upper() + listing[1:]} on a {scene.ground} checkered floor in front of a "
            f"{scene.wall} wall."]
    if len(singles) >= 2 and rng.random() < 0.7:
        near = min(singles, key=lambda e: e.depth)
        far = max(singles, key=lambda e: e.depth)

        def name(e: Entity) -> str:
            unique = sum(_matches(o, e.color, e.shape) for o in ents) == 1
            return f"{'the' if unique else 'a'} {e.color} {e.shape}"

        if rng.random() < 0.5 and near is not far:
            caps.append(f"{name(near).capitalize()} is closest to the camera and {name(far)} is "
                        "farthest away.")
        else:
            caps.append(f"{name(singles[0]).capitalize()} stands on the left and "
                        f"{name(singles[-1])} on the right.")
    return caps


def vqa_questions(ents: list[Entity], width: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Candidate multiple-choice questions about one scene, answers from the scene truth: dicts of
    ``question``, ``options`` (2 to 4), ``answer`` (a letter), MMBench ``category`` and ``l2``."""
    out: list[dict[str, Any]] = []
    singles = [e for e in ents if e.group < 0]
    uniq = [e for e in singles if sum(_matches(o, e.color, e.shape) for o in ents) == 1]

    def add(question: str, truth: str, distractors: list[str], category: str, l2: str) -> None:
        opts = [truth] + [d for d in dict.fromkeys(distractors) if d != truth][:3]
        if len(opts) < 2:
            return
        order = rng.permutation(len(opts))
        opts = [opts[j] for j in order]
        out.append({"question": question, "options": opts, "answer": "ABCD"[opts.index(truth)],
                    "category": category, "l2": l2})

    n = len(singles)
    nums = sorted({k for k in range(max(1, n - 3), n + 4) if k != n}, key=lambda k: (abs(k - n), k))
    add("How many objects are there in the image?", str(n), [str(k) for k in nums],
        "object_counting", "coarse_perception")
    colours_here = [e.color for e in singles]
    for shape in SHAPES:
        same = [e for e in singles if e.shape == shape]
        if len(same) == 1:
            others = [c for c in dict.fromkeys(colours_here) if c != same[0].color]
            others += [c for c in rng.permutation(COLOURS) if c not in others]
            add(f"What colour is the {shape}?", same[0].color, others,
                "attribute_recognition", "finegrained_perception (instance-level)")
    for colour in COLOURS:
        same = [e for e in singles if e.color == colour]
        if len(same) == 1:
            add(f"What shape is the {colour} object?", same[0].shape,
                [s for s in rng.permutation(SHAPES)], "attribute_recognition",
                "finegrained_perception (instance-level)")
    if len(uniq) >= 2 and len(uniq) == len(singles):
        for rel, q in (("nearest", "Which object is closest to the camera?"),
                       ("farthest", "Which object is farthest from the camera?")):
            best = [e for e in singles if _is_extreme(e, singles, rel, width)]
            if best:
                add(q, f"the {best[0].color} {best[0].shape}",
                    [f"the {e.color} {e.shape}" for e in rng.permutation(np.array(uniq, dtype=object))
                     if e is not best[0]], "depth_perception", "finegrained_perception (cross-instance)")
    margin = max(3.0, 0.06 * width)
    for ref in uniq:
        left = sorted([e for e in singles if e.cx + margin <= ref.cx], key=lambda e: -e.cx)
        if left and (len(left) == 1 or left[0].cx >= left[1].cx + margin):
            add(f"What colour is the object immediately to the left of the {ref.color} {ref.shape}?",
                left[0].color, [c for c in rng.permutation(COLOURS)], "spatial_relationship",
                "finegrained_perception (cross-instance)")
            break
    return out


def _a(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


MME_SUBTASKS = ("existence", "count", "position", "color")  # the MME perception subtasks the world asks
YES_NO = "Please answer yes or no."


def mme_questions(ents: list[Entity], width: int, rng: np.random.Generator) -> dict[str, tuple[str, str]]:
    """MME-style question pairs about one scene, per subtask of :data:`MME_SUBTASKS` the scene can
    ask: ``(question answered Yes, question answered No)``, both true of the scene truth and ending
    in "Please answer yes or no." as MME's do. Every visible object counts (crowds included), so a
    "No" is never a half-truth."""
    out: dict[str, tuple[str, str]] = {}
    present = {(e.color, e.shape) for e in ents}
    singles = [e for e in ents if e.group < 0]
    if ents:
        e = ents[int(rng.integers(len(ents)))]
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        if absent:
            c, s = absent[int(rng.integers(len(absent)))]
            out["existence"] = (f"Is there {_a(e.color)} {e.color} {e.shape} in this image? {YES_NO}",
                                f"Is there {_a(c)} {c} {s} in this image? {YES_NO}")
    if singles and len(singles) == len(ents):
        n = len(singles)
        wrong = n + (1 if n == 1 or rng.random() < 0.5 else -1)
        out["count"] = (f"Are there {n} object{'s' if n > 1 else ''} in this image? {YES_NO}",
                        f"Are there {wrong} object{'s' if wrong > 1 else ''} in this image? {YES_NO}")
    for shape in rng.permutation(SHAPES):
        same = [e for e in ents if e.shape == shape]
        if len(same) == 1:
            other = [c for c in COLOURS if c != same[0].color]
            out["color"] = (f"Is the {shape} {same[0].color}? {YES_NO}",
                            f"Is the {shape} {other[int(rng.integers(len(other)))]}? {YES_NO}")
            break
    uniq = [e for e in ents if sum(_matches(o, e.color, e.shape) for o in ents) == 1]
    margin = max(3.0, 0.06 * width)
    pairs = [(a, b) for a in uniq for b in uniq if a.cx + margin <= b.cx]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        na, nb = f"the {a.color} {a.shape}", f"the {b.color} {b.shape}"
        out["position"] = (f"Is {na} on the left of {nb}? {YES_NO}", f"Is {nb} on the left of {na}? {YES_NO}")
    return out
