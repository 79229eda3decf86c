"""Answer parsing (SPEC §6): HardBLINK labels and multiple-choice letters; unreadable = wrong."""

from __future__ import annotations

import pytest

from perceptio_core.evaluation.answers import find_labels, label_of, normalise_text, parse_choice, parse_mc_answer

ABC = ("A", "B", "C")


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("(A)", "A"),
        ("A", "A"),
        ("A.", "A"),
        ("(a)", "A"),
        ("a", "A"),
        (" ( b ) ", "B"),
        ("C)", "C"),
        ("The answer is (B).", "B"),
        ("Point B", "B"),
        ("point C is the closest to the camera.", "C"),
        ("B is the closest", "B"),
        ("A is the closest", "A"),  # only a weak "A ..." and nothing else: read as the label
        ("I think it is C.", "C"),  # the pronoun I is not a label
        ("A red circle: (B)", "B"),  # the article A loses against a real label
        ("Answer: B", "B"),
    ],
)
def test_hardblink_label_forms(answer, expected):
    assert parse_choice(answer, ABC) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "",
        "   ",
        "the closest one",  # no label
        "(A) or (B)",  # two labels
        "B and C",
        "The answer is (B), not C",
        "(F)",  # a label not among the choices
        "Point D",
        "D",
    ],
)
def test_hardblink_unreadable_is_none(answer):
    assert parse_choice(answer, ABC) is None


def test_choices_spelling_and_repeated_label():
    assert parse_choice("(b)", ["a", "b"]) == "b"  # returned as the choices spell it
    assert parse_choice("(B) ... yes, (B).", ABC) == "B"  # the same label twice is one label


def test_label_of_reference():
    assert label_of("(A)") == "A" and label_of("c") == "C"
    with pytest.raises(ValueError):
        label_of("none")


OPTS = {"A": "dog", "B": "cat", "C": "dark red", "D": "red"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("(c)", "C"),
        ("The answer is D.", "D"),
        ("cat", "B"),  # option text, exact
        ("It is a cat.", "B"),  # option text inside the answer
        ("A cat.", "B"),  # the weak article A loses against an option text
        ("Dark red!", "C"),  # exact match beats the contained "red"
        ("the car is dark red", "C"),  # "red" is inside the matched "dark red": dropped
        ("red", "D"),
        ("A dog", "A"),  # the article A, and text "dog" = option A: both agree
    ],
)
def test_mc_letters_then_text(answer, expected):
    assert parse_mc_answer(answer, OPTS) == expected


@pytest.mark.parametrize(
    "answer",
    [
        "E",  # a letter that is not an option: wrong, text not tried
        "(A) or (B)",
        "a dog and a cat",  # two option texts
        "a bird",  # no letter, no option text
        "",
    ],
)
def test_mc_unreadable_is_none(answer):
    assert parse_mc_answer(answer, OPTS) is None


def test_mc_a_fish_reads_the_weak_letter_when_no_text_matches():
    # documented: a weak "A ..." is read as the letter only when no option text matches
    assert parse_mc_answer("A fish", OPTS) == "A"
    assert find_labels("A fish") == {"A"}


def test_normalise_text():
    assert normalise_text("  Dark-Red, please! ") == "dark red please"


def test_parse_yes_no_reads_as_mme_calculation_does():
    from perceptio_core.evaluation.answers import parse_yes_no

    assert [parse_yes_no(t) for t in ("Yes", "no.", " YES ", "Yes, there is.", "No, it is not.", "Nope",
                                      "I think yes", "B", "", "not sure")] == [
        "Yes", "No", "Yes", "Yes", "No", "No", None, None, None, "No"]
