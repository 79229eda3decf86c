"""Fixtures shared by the core tests.

``public_hardblink``: a HardBLINK folder laid out exactly as AURORA publishes it
(``Data/evals/hardblink/`` of github.com/mahtabbigverdi/Aurora-perception; SPEC §6), written here
from that description and not by the project's own writer: for 3, 4 and 5 points, three questions
each in ``questions/blink_{N}pointscenter_questions.jsonl`` (``question_id``, ``image`` = a file name
in ``images/blink{N}pointscenter/``, ``text`` with the options, ``category``), the answers in
``answers/blink_{N}pointscenter_answers.jsonl`` (``"(B)"``) and 336x336 PNGs with the points drawn
on them (question i is named ``<i>.png`` and answered ``"(A)"``, ``"(B)"``, ``"(C)"`` for i = 0, 1, 2).
No point coordinates anywhere. Read-only: copy it to break it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

QUESTION = ("Multiple points are circled on the image, labeled by letters beside each circle. "
                   "Which point is the closest to the camera?")


@pytest.fixture(scope="session")
def public_hardblink(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("public_hardblink") / "hardblink"
    rng = np.random.default_rng(0)
    for n in (3, 4, 5):
        letters = "ABCDE"[:n]
        folder = root / "images" / f"blink{n}pointscenter"
        folder.mkdir(parents=True)
        questions, answers = [], []
        for i in range(3):
            im = Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
            draw = ImageDraw.Draw(im)
            for j, c in enumerate(letters):  # points drawn, never written down
                x, y = 40 + 60 * j, 100 + 30 * (j % 2)
                draw.ellipse([x - 9, y - 9, x + 9, y + 9], outline=(255, 0, 0), width=2)
                draw.rectangle([x + 12, y - 8, x + 24, y + 8], fill=(0, 0, 0))
                draw.text((x + 14, y - 6), c, fill=(255, 255, 255))
            im.save(folder / f"{i}.png")
            options = "\n".join(f"({c}) {c}" for c in letters)
            questions.append({"question_id": i, "image": f"{i}.png",
                              "text": f"{QUESTION}\nSelect from the following choices.\n{options}",
                              "category": "Relative_Depth"})
            answers.append({"question_id": i, "text": f"({'ABC'[i]})"})
        for sub, name, rows in (("questions", f"blink_{n}pointscenter_questions.jsonl", questions),
                                ("answers", f"blink_{n}pointscenter_answers.jsonl", answers)):
            (root / sub).mkdir(exist_ok=True)
            (root / sub / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root
