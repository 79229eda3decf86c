"""The perception tokens of the output sequence (SPEC §1): ``[SEG] <d_start> <d_k> x N <d_end>``.

One place defines their spelling, so the formatter, the tokenizer extension, the model, constrained
decoding and the evaluators can never disagree. The vocabulary grows by K + 3. K and N are the depth
codec's (:mod:`perceptio_core.depth.codec`); nothing here assumes them.
"""

from __future__ import annotations

SEG = "[SEG]"
D_START = "<d_start>"
D_END = "<d_end>"


def depth_token(k: int) -> str:
    """The token for depth code ``k`` (0 <= k < K)."""
    return f"<d_{k}>"


def perception_tokens(codebook_size: int) -> list[str]:
    """All added tokens, in the order they are added to a tokenizer: [SEG], markers, then K codes."""
    return [SEG, D_START, D_END] + [depth_token(k) for k in range(codebook_size)]
