"""Image files: load, validate once, digest (SPEC §5: every source's images are checked up front).

An image that cannot be used raises an :class:`ImageError` naming the path:
:class:`MissingImageError` when the file is absent, :class:`CorruptImageError` when it cannot be
decoded completely (corrupt, truncated, not an image). The digest of an image is the sha256 of its
file's bytes: the key under which its depth map and depth tokens are stored.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from perceptio_core.atomic_io import bytes_digest, file_digest


class ImageError(OSError):
    """An image cannot be used; ``path`` names it, ``reason`` says why ("missing image",
    "corrupt image") and ``detail`` adds the decoder's message where there is one."""

    def __init__(self, path: str | os.PathLike[str], reason: str, detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {self.path}" + (f" ({detail})" if detail else ""))

    @property
    def quarantine_reason(self) -> str:
        """``reason`` or ``"reason: detail"``: the text a quarantine entry carries."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


class MissingImageError(ImageError):
    """The image file does not exist."""


class CorruptImageError(ImageError):
    """The image file exists but cannot be decoded completely."""


@dataclass(frozen=True)
class ImageInfo:
    """A validated image: its size, format and the sha256 of its bytes."""

    path: str
    width: int
    height: int
    format: str
    digest: str


def image_digest(path: str | os.PathLike[str]) -> str:
    """:func:`~perceptio_core.atomic_io.file_digest` of an image file; a missing file raises
    :class:`MissingImageError` (so callers handle one error type)."""
    try:
        return file_digest(path)
    except FileNotFoundError as e:
        raise MissingImageError(path, "missing image") from e


def decode_image_bytes(data: bytes, path: str | os.PathLike[str]) -> tuple[Image.Image, str]:
    """Verify and fully decode image bytes; returns (loaded image, format). ``path`` only names
    the image in the :class:`CorruptImageError` raised when the bytes are not a complete image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                probe.verify()  # structure and checksums (PNG CRCs)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or ""
            im.load()  # full decode: catches truncated files
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise CorruptImageError(path, "corrupt image", f"{type(e).__name__}: {e}") from e
    return im, fmt


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError as e:
        raise MissingImageError(path, "missing image") from e
    except IsADirectoryError as e:
        raise CorruptImageError(path, "corrupt image", "a directory, not a file") from e


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Load an image file as an RGB PIL image. Raises :class:`MissingImageError` or
    :class:`CorruptImageError` (both :class:`ImageError`) naming the path."""
    im, _ = decode_image_bytes(_read(path), path)
    return im.convert("RGB")


def inspect_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image file once: digest its bytes, verify and decode it completely.
    Raises :class:`ImageError` naming the path."""
    data = _read(path)
    im, fmt = decode_image_bytes(data, path)
    return ImageInfo(str(path), im.width, im.height, fmt, bytes_digest(data))


class ImageValidator:
    """Validates each image path once and remembers the outcome (the info or the error), so
    datasets sharing images (RefCOCO, RefCOCO+ and RefCOCOg on COCO) check each file once."""

    def __init__(self) -> None:
        self._seen: dict[str, ImageInfo | ImageError] = {}

    def check(self, path: str | os.PathLike[str]) -> ImageInfo:
        """The :class:`ImageInfo` of ``path``; raises its :class:`ImageError` (again) if bad."""
        key = os.path.abspath(path)
        if key not in self._seen:
            try:
                self._seen[key] = inspect_image(key)
            except ImageError as e:
                self._seen[key] = e
        out = self._seen[key]
        if isinstance(out, ImageError):
            raise out
        return out

    def __len__(self) -> int:
        return len(self._seen)
