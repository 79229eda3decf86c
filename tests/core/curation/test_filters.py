"""Curation filters on hand-made cases (SPEC §5): degenerate masks, ambiguity, near-duplicates."""

from perceptio_core.curation.filters import (
    REASON_AMBIGUOUS,
    REASON_AMBIGUOUS_SAME_SENTENCE,
    REASON_EMPTY_MASK,
    REASON_LARGE_MASK,
    REASON_SMALL_MASK,
    NearDuplicateFilter,
    ambiguous_refs,
    degenerate_mask_reason,
    jaccard,
    normalize_expression,
    says_nothing_beyond,
    token_set,
)
from perceptio_core.data.records import RefRecord


def ref(ref_id, ann_id, sentence, category="cup", attributes=None, image_id=1):
    return RefRecord(
        dataset="refcoco", split_by="unc", ref_id=ref_id, sent_id=ref_id * 10, ann_id=ann_id,
        image_id=image_id, split="train", sentence=sentence, category_id=1, category=category,
        bbox=(0, 0, 1, 1), segmentation=[], iscrowd=0, area=1.0, attributes=attributes or {},
    )


def test_normalisation_and_jaccard():
    assert normalize_expression("The  Red-cup, on the LEFT!") == "red cup on left"
    assert token_set("a red cup") == frozenset({"red", "cup"})
    assert jaccard(token_set("red cup left"), token_set("the red cup on the left")) == 0.75
    assert jaccard(frozenset(), frozenset()) == 1.0


def test_degenerate_masks():
    assert degenerate_mask_reason(0, 10, 10, 4, 0.9) == REASON_EMPTY_MASK
    assert degenerate_mask_reason(3, 10, 10, 4, 0.9) == REASON_SMALL_MASK
    assert degenerate_mask_reason(95, 10, 10, 4, 0.9) == REASON_LARGE_MASK
    assert degenerate_mask_reason(50, 10, 10, 4, 0.9) is None


def test_near_duplicates_keep_the_first_per_object():
    f = NearDuplicateFilter(0.8)
    assert f.keep(7, "red cup on the left")
    assert not f.keep(7, "The red cup, on the left.")  # identical after normalisation
    assert not f.keep(7, "red cup on left")
    assert f.keep(7, "cup next to the plate")
    assert f.keep(8, "red cup on the left")  # another object: not a duplicate


def test_ambiguity_same_sentence_different_objects():
    refs = [ref(1, 100, "The cup."), ref(2, 101, "the cup"), ref(3, 102, "plate", category="plate")]
    out = ambiguous_refs(refs)
    assert out == {0: REASON_AMBIGUOUS_SAME_SENTENCE, 1: REASON_AMBIGUOUS_SAME_SENTENCE}


def test_ambiguity_look_alike_instances():
    red = {"colour": "red"}
    refs = [
        ref(1, 100, "red cup", attributes=red),  # says nothing beyond (cup, red): ambiguous
        ref(2, 101, "red cups on the left", attributes=red),  # "left" disambiguates
        ref(3, 101, "the red cup that is bigger", attributes=red),  # "bigger" disambiguates
        ref(4, 102, "cup", attributes={"colour": "blue"}),  # only blue cup: unique
        ref(5, 103, "a ball", category="ball"),  # only ball: unique
    ]
    assert ambiguous_refs(refs) == {0: REASON_AMBIGUOUS}
    assert says_nothing_beyond("the red cups", "cup", red)
    assert not says_nothing_beyond("the man in a red shirt", "person", {})


def test_same_object_several_sentences_is_not_ambiguous():
    refs = [ref(1, 100, "cup"), ref(2, 100, "cup")]
    assert ambiguous_refs(refs) == {}
