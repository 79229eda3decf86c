"""Answer parsing for the letter-answer benchmarks (SPEC §6): HardBLINK and multiple-choice VQA.

A generated answer is reduced to one choice label, or to None, which the evaluators score as wrong
(honest counting: an answer that cannot be read is never dropped).

:func:`parse_choice` (HardBLINK; also the first step for VQA) accepts the label in the usual forms:
``"(A)"``, ``"A"``, ``"A."``, ``"(a)"``, ``"The answer is (B)."``, ``"Point B"``, ``"B is the closest"``.
The rules, in order:

1. The whole answer is one letter, optionally in parentheses and/or followed by ``.``, ``)`` or
   ``:`` (``"A"``, ``"a."``, ``"(b)"``): that letter, any case.
2. Otherwise the candidates are every letter in parentheses, any case (``"(a)"``), and every
   standalone capital letter (a capital with no letter or apostrophe on either side: ``"Point B"``,
   ``"B."``, ``"answer: C"``). A standalone ``A`` or ``I`` followed by a space and a lowercase word
   reads as an English word (the article "A red cube", the pronoun "I think") and is a weak
   candidate, used only when there is no other candidate (``"A is the closest"`` -> A).
3. Exactly one distinct candidate that is among the choices: that label. Two different labels
   (``"(A) or (B)"``), no label, or a label that is not among the choices (``"(F)"`` with A-C) give
   None.

:func:`parse_mc_answer` (MMBench-style VQA) applies :func:`parse_choice` first; when it finds no
letter at all it matches the options' texts, as MMBench's evaluator does after letter matching:

- the answer, normalised (lowercase, punctuation to spaces, whitespace collapsed), equals one
  option's normalised text: that option;
- else the options whose normalised text occurs in the answer as whole words; options whose text
  is contained in another matched option's text are dropped (``"dark red"`` beats ``"red"``);
  exactly one left: that option; none or several: None.

A letter found by rule 1 or as a strong candidate decides (a letter that is not an option, ``"E"``
with options A-D, makes the answer wrong; text matching is not tried then). An answer whose only
letter is a weak one (``"A cat."``) is matched by text first, and read as that letter only when no
option text matches.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping

_WHOLE = re.compile(r"^\s*\(?\s*([A-Za-z])\s*\)?\s*[.):]?\s*$")
_PAREN = re.compile(r"\(\s*([A-Za-z])\s*\)")
_STANDALONE = re.compile(r"(?<![A-Za-z'’])([A-Z])(?![A-Za-z'’])")
_WORDLIKE = re.compile(r" +[a-z]")
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def _candidates(answer: str) -> tuple[set[str], set[str]]:
    """(strong, weak) candidate labels of ``answer`` (rule 2 of the module docstring)."""
    strong = {m.group(1).upper() for m in _PAREN.finditer(answer)}
    paren_spans = [m.span() for m in _PAREN.finditer(answer)]
    weak: set[str] = set()
    for m in _STANDALONE.finditer(answer):
        if any(a <= m.start() < b for a, b in paren_spans):
            continue
        letter = m.group(1)
        if letter in ("A", "I") and _WORDLIKE.match(answer, m.end()):
            weak.add(letter)
        else:
            strong.add(letter)
    return strong, weak


def _labels(answer: str) -> tuple[set[str], str]:
    """The labels ``answer`` names (upper case) and how they were found: ``"whole"`` (rule 1),
    ``"strong"`` or ``"weak"`` (rule 2), ``"none"``."""
    m = _WHOLE.match(answer or "")
    if m:
        return {m.group(1).upper()}, "whole"
    strong, weak = _candidates(answer or "")
    if strong:
        return strong, "strong"
    return (weak, "weak") if weak else (set(), "none")


def find_labels(answer: str) -> set[str]:
    """Every label :func:`parse_choice` would consider in ``answer`` (upper case), whatever the
    choices: the whole-answer letter, else the strong candidates, else the weak ones."""
    return _labels(answer)[0]


def _one(found: set[str], choices: Iterable[str]) -> str | None:
    spelled = {str(c).strip().upper(): str(c).strip() for c in choices}
    if len(found) != 1:
        return None
    return spelled.get(next(iter(found)))


def parse_choice(answer: str, choices: Iterable[str]) -> str | None:
    """The one label of ``choices`` that ``answer`` names, or None (module docstring).

    ``parse_choice("The answer is (B).", "ABC")`` -> ``"B"``; ``parse_choice("(A) or (B)", "ABC")``
    -> None. ``choices`` are labels such as ``("A", "B", "C")`` (any case; compared upper case).
    Returns the label as spelled in ``choices``.
    """
    return _one(find_labels(answer), choices)


def normalise_text(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def _contains_words(haystack: str, needle: str) -> bool:
    return bool(needle) and f" {needle} " in f" {haystack} "


def parse_mc_answer(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter that ``answer`` chooses among ``options`` ({"A": text, ...}), or None.

    Letters first (:func:`parse_choice`), then option texts when no letter is present (module
    docstring); an answer whose only letter is a weak one (``"A cat"``) is matched by text first
    and read as that letter only when no option text matches.
    ``parse_mc_answer("It is a cat", {"A": "dog", "B": "cat"})`` -> ``"B"``.
    """
    found, how = _labels(answer)
    if how in ("whole", "strong"):
        return _one(found, options.keys())
    by_text = _match_option_text(answer, options)
    if by_text is not None or how == "none":
        return by_text
    return _one(found, options.keys())  # only a weak "A ..." / "I ...": read it as a letter


def _match_option_text(answer: str, options: Mapping[str, str]) -> str | None:
    norm = normalise_text(answer)
    if not norm:
        return None
    texts = {k: normalise_text(v) for k, v in options.items()}
    exact = [k for k, t in texts.items() if t and t == norm]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        return None
    hits = [k for k, t in texts.items() if _contains_words(norm, t)]
    hits = [k for k in hits if not any(o != k and texts[k] != texts[o] and _contains_words(texts[o], texts[k])
                                       for o in hits)]
    return hits[0] if len(hits) == 1 else None


def label_of(answer: str) -> str:
    """A reference answer such as ``"(A)"`` or ``"A"`` -> ``"A"`` (raises ``ValueError`` if none)."""
    found = find_labels(answer)
    if len(found) != 1:
        raise ValueError(f"reference answer {answer!r} does not name one label")
    return next(iter(found))




def parse_yes_no(answer: str) -> str | None:
    """``"Yes"``, ``"No"`` or None, read as MME's own scoring script reads a prediction
    (``eval_tool/calculation.py``): lower-cased, periods removed, exactly "yes"/"no", else "yes" or
    else "no" within its first four characters; anything else is unreadable (scored wrong)."""
    text = (answer or "").lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text.capitalize()
    head = text[:4]
    if "yes" in head:
        return "Yes"
    return "No" if "no" in head else None


__all__ = ["find_labels", "label_of", "normalise_text", "parse_choice", "parse_mc_answer", "parse_yes_no"]
