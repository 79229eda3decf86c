"""The depth codec as every stage after ``train_vqvae`` sees it (SPEC §1, §2): K and N, and the
three operations the model needs. The one source of K and N downstream of the codebook.

* :class:`DepthCodec`: the typed interface (a ``typing.Protocol``, checkable at run time) of a frozen
  depth tokenizer: ``codebook_size`` (K), ``num_tokens`` (N = grid x grid, row-major), ``grid``,
  ``map_size`` (the side of the maps it takes and gives back), ``encode`` / ``decode`` /
  ``soft_decode``. :class:`perceptio_core.depth.tokenizer.DepthTokenizer` satisfies it; the model
  takes any ``nn.Module`` that does (tests use a small stand-in).
* :class:`DepthCodecSpec`: the numbers alone (K, grid, map size; N derived), for a stage that needs
  only them. :meth:`DepthCodecSpec.from_pretrained` reads them from the codebook artifact's
  ``config.json`` (written by ``VQVAE.save_pretrained``) without loading any weight;
  :meth:`DepthCodecSpec.of` takes them from a loaded codec.

No K or N is ever defaulted or read from a run's config after the codebook exists: the VQ-VAE's own
config (``vqvae.codebook_size``, ``vqvae.grid``) builds the codebook, and from then on the artifact
says what they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

CONFIG_NAME = "config.json"  # the VQ-VAE artifact's architecture config (VQVAE.save_pretrained)


@runtime_checkable
class DepthCodec(Protocol):
    """A frozen depth tokenizer: maps [B, H, W] <-> code indices [B, N] over K codes.

    ``isinstance(x, DepthCodec)`` checks that the members exist (not their types).
    """

    codebook_size: int  # K
    num_tokens: int  # N = grid * grid
    grid: int  # latent grid side
    map_size: int  # side S of the maps decode / soft_decode give back (and encode resizes to)

    def encode(self, maps: Any) -> torch.Tensor:
        """maps [B, H, W] in [0, 1] -> LongTensor [B, N] of code indices, row-major."""
        ...

    def decode(self, indices: Any) -> torch.Tensor:
        """indices [B, N] -> maps [B, S, S]."""
        ...

    def soft_decode(self, logits: Any, tau: float = 1.0) -> torch.Tensor:
        """code logits [B, L, K] -> maps [B, S, S], differentiable in ``logits`` (SPEC §3 L_rec)."""
        ...


@dataclass(frozen=True)
class DepthCodecSpec:
    """K, the grid and the map size of a depth codec; ``num_tokens`` (N) = grid^2.

    ``source`` names where the numbers were read (an artifact's ``config.json``, a codec's class),
    for error messages; it takes no part in equality.
    """

    codebook_size: int
    grid: int
    map_size: int
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "grid", "map_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{self._where()}{name} must be an int, got {v!r}")
        if self.codebook_size < 2 or self.grid < 1 or self.map_size < 1:
            raise ValueError(f"{self._where()}K = {self.codebook_size} (>= 2), grid = {self.grid} (>= 1) and "
                             f"map size = {self.map_size} (>= 1) expected")  # fmt: skip

    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    @property
    def num_tokens(self) -> int:
        """N: code indices per map (grid x grid, row-major)."""
        return self.grid * self.grid

    def to_dict(self) -> dict[str, int]:
        """``{"codebook_size", "grid", "map_size", "num_tokens"}`` (N included for readers)."""
        return {"codebook_size": self.codebook_size, "grid": self.grid, "map_size": self.map_size,
                "num_tokens": self.num_tokens}  # fmt: skip

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "") -> DepthCodecSpec:
        """The inverse of :meth:`to_dict`; a ``num_tokens`` that is not grid^2 is refused."""
        missing = [k for k in ("codebook_size", "grid", "map_size") if k not in raw]
        if missing:
            raise ValueError(f"{source or 'depth codec'}: missing {missing}")
        spec = cls(raw["codebook_size"], raw["grid"], raw["map_size"], source=source)
        if "num_tokens" in raw and raw["num_tokens"] != spec.num_tokens:
            raise ValueError(f"{source or 'depth codec'}: num_tokens {raw['num_tokens']} is not grid^2 = "
                             f"{spec.num_tokens}")  # fmt: skip
        return spec

    @classmethod
    def of(cls, codec: DepthCodec) -> DepthCodecSpec:
        """The numbers of a loaded codec; refuses an object that is not a :class:`DepthCodec` or
        whose ``num_tokens`` is not ``grid ** 2``."""
        if not isinstance(codec, DepthCodec):
            raise TypeError(f"{type(codec).__name__} is not a DepthCodec (needs codebook_size, num_tokens, grid, "
                            "map_size, encode, decode, soft_decode)")  # fmt: skip
        name = type(codec).__name__
        spec = cls(codec.codebook_size, codec.grid, codec.map_size, source=name)
        if codec.num_tokens != spec.num_tokens:
            raise ValueError(f"{name}: num_tokens {codec.num_tokens} is not grid^2 = {spec.num_tokens}")
        return spec

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> DepthCodecSpec:
        """K, grid and map size of the codebook artifact at ``directory`` (the ``train_vqvae`` stage's
        folder, or any ``VQVAE.save_pretrained`` folder), read from its ``config.json``
        (``codebook_size``, ``grid``, ``input_size``) without loading the weights."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no depth codebook at {directory}: {path} not found")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from e
        missing = [k for k in ("codebook_size", "grid", "input_size") if k not in raw]
        if missing:
            raise ValueError(f"{path}: not a VQ-VAE config (missing {missing})")
        return cls(raw["codebook_size"], raw["grid"], raw["input_size"], source=str(path))

    def check_matches(self, other: DepthCodecSpec) -> None:
        """Raise ``ValueError`` naming both sources unless ``other`` has the same K, grid and map size."""
        if self != other:
            raise ValueError(
                f"depth codec mismatch: {self.source or 'one'} has K = {self.codebook_size}, N = {self.num_tokens} "
                f"(grid {self.grid}), maps {self.map_size} px; {other.source or 'the other'} has "
                f"K = {other.codebook_size}, N = {other.num_tokens} (grid {other.grid}), maps {other.map_size} px"
            )


__all__ = ["DepthCodec", "DepthCodecSpec"]
