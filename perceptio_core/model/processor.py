"""InternVL's image processing, as the checkpoint's own processor does it (SPEC §4): dynamic tiling.

InternVL2.5 / InternVL3 train and evaluate with *dynamic resolution*: an image is resized to the
grid of ``cols x rows`` tiles of ``tile_size`` (448) pixels whose aspect ratio is closest to the
image's, among the grids of ``min_tiles`` to ``max_tiles`` tiles, and cut into those tiles (row
major); when there is more than one tile a *thumbnail* (the whole image resized to one tile) is
appended. Each tile becomes ``tokens_per_tile`` (256) ``<IMG_CONTEXT>`` tokens, so the prompt holds
``<img>`` + ``<IMG_CONTEXT>`` x (256 x tiles) + ``</img>`` and the model's ``pixel_values`` are the
tiles of every image of the batch concatenated, [sum of tiles, 3, S, S] (InternVL's
``masked_scatter`` fills the context tokens in that order).

The grid rule (OpenGVLab's ``find_closest_aspect_ratio``, which transformers'
``GotOcr2ImageProcessor`` reproduces as ``get_optimal_tiled_canvas``): candidates are the grids
with ``min_tiles <= cols * rows <= max_tiles`` sorted by tile count; the first with the smallest
``|W/H - cols/rows|`` wins, and a later grid of the same ratio (more tiles) replaces it while the
image's area exceeds half the grid's pixel area. Tiles are cut from the bicubic resize to
``(cols * S, rows * S)``; pixels are scaled to [0, 1] and normalised with the checkpoint's mean and
std (ImageNet's for InternVL).

:class:`TileProcessor` is read from the checkpoint's ``preprocessor_config.json`` (the
``GotOcr2ImageProcessor`` fields transformers' InternVL conversion writes: ``size``,
``image_mean``, ``image_std``, ``crop_to_patches``, ``min_patches``, ``max_patches``) and saved the
same way, so the tiny offline base and a released checkpoint go through one code path, and
transformers' own ``InternVLProcessor`` reads what we write. ``max_tiles`` is a setting of the run
(InternVL's fine-tuning scripts use 6 for training and 12 for evaluation: ``model.max_tiles`` and
``evaluate.max_tiles``); 1 tile means the plain square resize of one tile, no thumbnail.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # InternVL's image normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
_BICUBIC = int(Image.Resampling.BICUBIC)


@functools.lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every ``(cols, rows)`` with ``min_tiles <= cols * rows <= max_tiles``, by tile count."""
    grids = {(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles}  # fmt: skip
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], g)))


def tile_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The ``(cols, rows)`` grid of an image of ``width x height`` (see the module docstring)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


@dataclass(frozen=True)
class TileProcessor:
    """Dynamic tiling + normalisation of one InternVL checkpoint (module docstring).

    tile_size: tile side S in pixels (the vision tower's image size); tokens_per_tile: the
    ``<IMG_CONTEXT>`` tokens of one tile (``(S / patch)^2 * downsample^2``); min_tiles / max_tiles:
    the grid's tile count bounds; thumbnail: append the whole-image tile when there are several.
    """

    tile_size: int
    tokens_per_tile: int
    min_tiles: int = 1
    max_tiles: int = 1
    thumbnail: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resample: int = _BICUBIC

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")

    # ---------------------------------------------------------------- counts

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """``(cols, rows)`` of an image of ``width x height``; ``(1, 1)`` with one tile at most."""
        if self.max_tiles == 1:
            return (1, 1)
        return tile_grid(width, height, self.tile_size, self.min_tiles, self.max_tiles)

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles fed to the vision tower for an image of ``width x height`` (thumbnail included)."""
        cols, rows = self.grid(width, height)
        n = cols * rows
        return n + 1 if self.thumbnail and n > 1 else n

    def num_image_tokens(self, width: int, height: int) -> int:
        """``<IMG_CONTEXT>`` tokens of an image of ``width x height``."""
        return self.tokens_per_tile * self.num_tiles(width, height)

    # ---------------------------------------------------------------- pixels

    def tile_images(self, image: Image.Image) -> list[Image.Image]:
        """The RGB tiles of ``image`` (row major, thumbnail last), each ``tile_size`` square."""
        image = image.convert("RGB")
        s = self.tile_size
        cols, rows = self.grid(image.width, image.height)
        if cols * rows == 1:
            return [image.resize((s, s), resample=self.resample)]
        resized = image.resize((cols * s, rows * s), resample=self.resample)
        tiles = [resized.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(rows) for c in range(cols)]
        if self.thumbnail:
            tiles.append(image.resize((s, s), resample=self.resample))
        return tiles

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """``image`` -> normalised tiles [n, 3, S, S] float32."""
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arrays = [(np.asarray(t, dtype=np.float32) / 255.0 - mean) / std for t in self.tile_images(image)]
        return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))

    # ---------------------------------------------------------------- settings and files

    def with_max_tiles(self, max_tiles: int | None) -> TileProcessor:
        """This processor with another ``max_tiles`` (None or 0: unchanged)."""
        if not max_tiles:
            return self
        return replace(self, max_tiles=int(max_tiles), min_tiles=min(self.min_tiles, int(max_tiles)))

    def to_preprocessor_config(self) -> dict:
        """The ``GotOcr2ImageProcessor`` config transformers' InternVL processor reads."""
        return {
            "image_processor_type": "GotOcr2ImageProcessor",
            "processor_class": "InternVLProcessor",
            "crop_to_patches": self.max_tiles > 1,
            "min_patches": self.min_tiles,
            "max_patches": self.max_tiles,
            "size": {"height": self.tile_size, "width": self.tile_size},
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "resample": self.resample,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "do_convert_rgb": True,
        }

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``preprocessor_config.json`` and ``processor_config.json`` into ``folder``."""
        from perceptio_core.atomic_io import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / PREPROCESSOR_CONFIG, self.to_preprocessor_config())
        write_json(folder / PROCESSOR_CONFIG, {"processor_class": "InternVLProcessor",
                                                "image_seq_length": self.tokens_per_tile})  # fmt: skip

    @classmethod
    def for_model(
        cls, model_config, folders: Sequence[str | Path | None] = (), max_tiles: int | None = None
    ) -> TileProcessor:
        """The processor of an InternVL whose ``InternVLConfig`` is ``model_config``: tile size and
        tokens per tile from the config; mean, std, tile bounds from the first of ``folders`` that
        holds a ``preprocessor_config.json`` (else ImageNet's, one tile); ``max_tiles`` overrides
        the file's bound (0 or None: keep it). A file whose tile size disagrees with the vision
        tower is an error naming it."""
        vc = model_config.vision_config
        size = int(vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size)
        patch = int(vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size)
        per_tile = int(round((size // patch) ** 2 * model_config.downsample_ratio**2))
        proc = cls(tile_size=size, tokens_per_tile=per_tile)
        for folder in folders:
            if folder is not None and (Path(folder) / PREPROCESSOR_CONFIG).is_file():
                proc = _read(Path(folder) / PREPROCESSOR_CONFIG, proc)
                break
        return proc.with_max_tiles(max_tiles)


def _read(path: Path, proc: TileProcessor) -> TileProcessor:
    """``proc`` updated from a ``preprocessor_config.json`` (GotOcr2 or CLIP-style fields)."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable preprocessor config ({e})") from e
    size = cfg.get("size", proc.tile_size)
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if side is not None and int(side) != proc.tile_size:
        raise ValueError(f"{path}: tile size {side} differs from the vision tower's image size {proc.tile_size}")
    crop = bool(cfg.get("crop_to_patches", False))
    max_tiles = int(cfg.get("max_patches", 12)) if crop else 1
    return replace(
        proc,
        min_tiles=min(int(cfg.get("min_patches", 1)), max_tiles),
        max_tiles=max_tiles,
        mean=tuple(float(x) for x in cfg.get("image_mean", proc.mean)),
        std=tuple(float(x) for x in cfg.get("image_std", proc.std)),
        resample=int(cfg.get("resample", proc.resample)),
    )


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TileProcessor", "candidate_grids", "tile_grid"]
