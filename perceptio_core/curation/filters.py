"""Curation filters of SPEC §5: degenerate masks, ambiguous expressions, near-duplicates.

All are pure functions or small per-group objects over plain values, so curation can apply them
while streaming and tests can exercise them on hand-made cases. Each drop has a fixed reason label
(the ``REASON_*`` constants) so the curation stats aggregate by reason.

Expression normalisation: lowercase, punctuation to spaces, articles ("a", "an", "the") removed,
whitespace collapsed. Near-duplicates: two expressions of the same object whose normalised token
sets have Jaccard similarity >= a threshold; the first one (in record order) is kept.

Ambiguity (an expression that fits several objects), two rules within one image:

1. **Same expression, several objects**: refs whose normalised sentences are equal but point to
   different annotations are all dropped.
2. **Same description, no disambiguating word**: several annotated instances share the same
   (category, attributes) key, and the expression says nothing beyond that key: once articles,
   function words, the category's words and the shared attribute values are removed, no word is
   left (so "the red cup" is ambiguous among two red cups; "red cup on the left" is not, nor is any
   expression with a word we cannot account for). Instances are those the refs of the image name.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from perceptio_core.data.records import RefRecord

REASON_EMPTY_MASK = "empty mask"
REASON_SMALL_MASK = "mask below min area"
REASON_LARGE_MASK = "mask above max fraction"
REASON_AMBIGUOUS = "ambiguous expression"
REASON_AMBIGUOUS_SAME_SENTENCE = "same expression for several objects"
REASON_NEAR_DUPLICATE = "near-duplicate expression"
REASON_EMPTY_EXPRESSION = "empty expression"

ARTICLES = frozenset({"a", "an", "the"})
# function words that never tell two objects apart (spatial / ordinal / comparative words are absent
# on purpose: "left", "front", "second", "bigger" disambiguate)
FUNCTION_WORDS = frozenset(
    {
        "a", "an", "the", "this", "that", "these", "those", "is", "are", "it", "its", "of", "with",
        "in", "on", "and", "or", "one", "ones", "some", "thing", "object", "there", "which", "who",
        "to", "at", "for", "piece", "kind", "color", "colored", "coloured", "colour",
    }
)  # fmt: skip

_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize_expression(text: str) -> str:
    """Lowercase, punctuation to spaces, articles removed, whitespace collapsed."""
    words = _NON_WORD.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def token_set(text: str) -> frozenset[str]:
    """The set of words of the normalised expression."""
    return frozenset(normalize_expression(text).split())


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def degenerate_mask_reason(area: int, height: int, width: int, min_area: int, max_frac: float) -> str | None:
    """The drop reason of a mask of ``area`` pixels in an image of ``height`` x ``width``, or None
    when it is usable: empty, below ``min_area`` pixels, or covering more than ``max_frac``."""
    if area <= 0:
        return REASON_EMPTY_MASK
    if area < min_area:
        return REASON_SMALL_MASK
    if area > max_frac * height * width:
        return REASON_LARGE_MASK
    return None


class NearDuplicateFilter:
    """Per-object memory of kept expressions; :meth:`keep` says whether a new one is new enough.

    ``threshold``: Jaccard of token sets at or above which an expression is a near-duplicate of one
    already kept for the same object. Use one instance per image group and drop it afterwards, so
    memory stays bounded while streaming.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._kept: dict[Any, list[frozenset[str]]] = defaultdict(list)

    def keep(self, obj: Any, text: str) -> bool:
        """True (and remember ``text``) unless it is a near-duplicate of a kept expression of ``obj``."""
        toks = token_set(text)
        for prev in self._kept[obj]:
            if jaccard(toks, prev) >= self.threshold:
                return False
        self._kept[obj].append(toks)
        return True


def _singular(word: str) -> str:
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "ch", "sh")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def _attribute_words(attributes: Mapping[str, Any]) -> frozenset[str]:
    words: set[str] = set()
    for v in attributes.values():
        if isinstance(v, str):
            words.update(normalize_expression(v).split())
    return frozenset(words)


def instance_key(category: str, attributes: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(category, sorted text attributes) of an object: two instances with equal keys look alike as
    far as the annotations know. Only text values count (colour, shape, size class, material):
    numbers such as a centroid or a depth are measurements, not appearance."""
    items = tuple(sorted((str(k), v.strip().lower()) for k, v in attributes.items() if isinstance(v, str)))
    return category, items


def says_nothing_beyond(sentence: str, category: str, attributes: Mapping[str, Any]) -> bool:
    """True when every word of ``sentence`` is a function word, a word of the category name, or a
    word of the attribute values (singular/plural folded)."""
    known = {_singular(w) for w in normalize_expression(category).split()}
    known |= {_singular(w) for w in _attribute_words(attributes)}
    for word in normalize_expression(sentence).split():
        if word in FUNCTION_WORDS:
            continue
        if _singular(word) not in known:
            return False
    return True


def ambiguous_refs(refs: Sequence[RefRecord]) -> dict[int, str]:
    """Which refs of ONE image (one dataset) are ambiguous, by position in ``refs`` -> reason.

    See the module docstring for the two rules.
    """
    out: dict[int, str] = {}
    # rule 1: the same normalised sentence for different objects
    anns_by_sentence: dict[str, set[int]] = defaultdict(set)
    for r in refs:
        anns_by_sentence[normalize_expression(r.sentence)].add(r.ann_id)
    for i, r in enumerate(refs):
        if len(anns_by_sentence[normalize_expression(r.sentence)]) > 1:
            out[i] = REASON_AMBIGUOUS_SAME_SENTENCE
    # rule 2: look-alike instances and an expression that says nothing beyond what they share
    anns_by_key: dict[Any, set[int]] = defaultdict(set)
    for r in refs:
        anns_by_key[instance_key(r.category, r.attributes)].add(r.ann_id)
    for i, r in enumerate(refs):
        if i in out:
            continue
        if len(anns_by_key[instance_key(r.category, r.attributes)]) > 1 and says_nothing_beyond(
            r.sentence, r.category, r.attributes
        ):
            out[i] = REASON_AMBIGUOUS
    return out
