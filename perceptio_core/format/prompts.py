"""Light prompt templates that elicit the perception block (SPEC §1, last bullet; §6 wording).

A few templates per task; which one a sample gets is a pure function of its key (a sha256 of
``task:key``), never of global random state, so curation is reproducible and evaluation can ask
the same way with :func:`render_prompt` (``variant=0`` gives the first, canonical template).

Fields per task: ``refer_seg`` {expr} (round 1 of a referring conversation: mask, depth, description),
``refer_seg_round`` {expr} (its later rounds: a mask and a short answer, no depth block), ``semantic_seg`` {category}, ``depth_cot`` {question},
``grounded_conv`` (none), ``vqa_mc`` {question} {options}, ``instruct`` {question}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

# SPEC §6: the HardBLINK question, verbatim.
HARDBLINK_QUESTION = (
    "Multiple points are circled on the image, labeled by letters beside each circle. "
    "Which point is the closest to the camera?"
)

HARDBLINK_CHOICES = "Select from the following choices."


def hardblink_text(labels: list[str]) -> str:
    """A HardBLINK question as the world writes it and depth chain-of-thought training asks it:
    SPEC §6's question, then its options one a line, as BLINK's multiple-choice questions list
    them (:data:`HARDBLINK_CHOICES`, then ``"(A) A"``, ...)."""
    return "\n".join([HARDBLINK_QUESTION, HARDBLINK_CHOICES] + [f"({x}) {x}" for x in labels])


TEMPLATES: dict[str, tuple[str, ...]] = {
    "refer_seg": (
        "Please segment the object described as: {expr}. Show its mask and the depth of the scene "
        "before answering.",
        "Where is {expr} in this image? Segment it, give the depth of the scene, then describe it "
        "in one sentence.",
        "Find {expr}. Output its segmentation mask and the scene depth first, then a short "
        "description of the object.",
        "Segment {expr} and estimate the depth of the image, then describe the object briefly.",
    ),
    "refer_seg_round": (
        "Please segment {expr}.",
        "And {expr}? Segment it.",
        "Now find {expr} and show its mask.",
        "Can you segment {expr} in this image?",
    ),
    "semantic_seg": (
        "Please segment every {category} region in this image. Show the mask and the depth of the "
        "scene before answering.",
        "Which parts of this scene are {category}? Segment them, give the depth of the scene, then "
        "answer in one sentence.",
        "Segment all {category} in the image and estimate the scene depth, then describe where it "
        "is.",
    ),
    "depth_cot": (
        "{question} Think about the depth of the scene first, then answer with the letter in "
        "parentheses.",
        "{question} Estimate the depth of the image before answering with the point's letter, "
        "e.g. (A).",
        "{question} First give the depth of the scene, then the letter of the closest point.",
    ),
    "grounded_conv": (
        "Could you please give me a detailed description of the image? Please respond with "
        "interleaved segmentation masks for the corresponding parts of the answer.",
        "Can you provide a thorough description of this image? Please output with interleaved "
        "segmentation masks for the corresponding phrases.",
        "Please describe in detail the contents of the image. Please respond with interleaved "
        "segmentation masks for the corresponding parts of the answer.",
    ),
    "vqa_mc": (
        "{question}\n{options}\nAnswer with the option's letter from the given choices directly.",
    ),
    "instruct": ("{question}",),
}


def clean_expression(sentence: str) -> str:
    """A referring expression as prompts carry it: trailing punctuation dropped, whitespace
    collapsed (curation, evaluation and the base fit's region descriptions alike)."""
    return " ".join(sentence.strip().rstrip(".!?;,").split())


def template_index(task: str, key: str) -> int:
    """Which of ``TEMPLATES[task]`` the sample ``key`` uses (stable across runs and machines)."""
    n = len(TEMPLATES[task])
    h = hashlib.sha256(f"{task}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") % n


def render_prompt(task: str, key: str | None = None, variant: int | None = None, **fields: str) -> str:
    """The prompt of a sample: template chosen from ``key`` (or ``variant``; neither: the first).

    ``render_prompt("refer_seg", "refcoco-unc-train-r1-s2", expr="man on the left")``
    """
    if task not in TEMPLATES:
        raise KeyError(f"no prompt templates for task {task!r} (known: {', '.join(TEMPLATES)})")
    if variant is None:
        variant = template_index(task, key) if key is not None else 0
    template = TEMPLATES[task][variant % len(TEMPLATES[task])]
    return template.format(**fields).strip()


def format_mc_prompt(question: str, options: Mapping[str, str], hint: str = "") -> str:
    """A multiple-choice prompt, MMBench-style as LLaVA evaluates it: the hint (when there is one)
    on the line before the question, then one ``"A. text"`` line per option in letter order (as
    :func:`perceptio_core.data.vqa.options_text`), then the ``vqa_mc`` template's instruction.

    ``format_mc_prompt("What is it?", {"A": "cat", "B": "dog"})`` ->
    ``"What is it?\\nA. cat\\nB. dog\\nAnswer with the option's letter from the given choices directly."``
    Training prompts for VQA (base fit, fine-tuning) must be built with this same function.
    """
    q = question.strip()
    if hint and hint.strip():
        q = f"{hint.strip()}\n{q}"
    opts = "\n".join(f"{k}. {str(v).strip()}" for k, v in sorted(options.items()))
    return render_prompt("vqa_mc", variant=0, question=q, options=opts)
