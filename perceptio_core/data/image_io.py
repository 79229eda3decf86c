"""Image files: load, validate once, digest (SPEC §5: every source's images are checked up front).

An image that cannot be used raises an :class:`ImageError` naming the path:
:class:`MissingImageError` when the file is absent, :class:`CorruptImageError` when it cannot be
decoded completely (corrupt, truncated, not an image, not a regular file),
:class:`ImageTooLargeError` when the file is over :data:`~perceptio_core.data.limits.MAX_IMAGE_BYTES`
or its header declares more than :data:`~perceptio_core.data.limits.MAX_IMAGE_PIXELS` (checked before
reading or decoding: a FIFO or ``/dev/zero`` is never read, a decompression bomb never decoded). The
digest of an image is the sha256 of its file's bytes: the key under which its depth map and depth
tokens are stored. :func:`confined` keeps a name read from an annotation under its image root.
"""

from __future__ import annotations

import io
import re
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from perceptio_core.atomic_io import bytes_digest, file_digest
from perceptio_core.data.limits import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from perceptio_core.data.records import REASON_CORRUPT_IMAGE, REASON_MISSING_IMAGE, REASON_TOO_LARGE


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
    """The image file exists but cannot be decoded completely (or is not a regular file)."""


class ImageTooLargeError(ImageError):
    """The image file, or the pixel count its header declares, is over a limit of
    :mod:`perceptio_core.data.limits` (the detail names it); nothing was decoded."""


def confined(root: str | os.PathLike[str], name: str) -> Path | None:
    """``root / name`` when ``name`` is a relative path that stays under ``root`` (``..`` parts may
    not climb out; an absolute ``name`` such as ``/dev/zero`` is refused), else None. Symbolic links
    inside the root are followed as they are (datasets are often linked in), so the check is on the
    names; :func:`read_regular` then refuses anything that is not a regular file."""
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        return None
    rel = Path(name)
    if rel.is_absolute():
        return None
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep):
        return None
    return Path(root) / norm


def read_regular(path: str | os.PathLike[str], limit: int = MAX_IMAGE_BYTES, what: str = "image",
                 limit_name: str = "MAX_IMAGE_BYTES") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, checked before it is opened: a FIFO
    (which would hang) or a device such as ``/dev/zero`` (which never ends) is never read. Raises
    :class:`MissingImageError` (absent), :class:`CorruptImageError` (a directory, not a regular file,
    unreadable) or :class:`ImageTooLargeError` (over ``limit``), each naming the path."""
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise MissingImageError(path, REASON_MISSING_IMAGE) from e
    except (OSError, ValueError) as e:  # ValueError: a name with a NUL or a lone surrogate
        raise CorruptImageError(path, REASON_CORRUPT_IMAGE, f"cannot stat the file ({type(e).__name__})") from e
    if stat.S_ISDIR(st.st_mode):
        raise CorruptImageError(path, REASON_CORRUPT_IMAGE, "a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise CorruptImageError(path, REASON_CORRUPT_IMAGE, "not a regular file (a FIFO, a device or a socket)")
    if st.st_size > limit:
        raise ImageTooLargeError(path, REASON_TOO_LARGE,
                                 f"{what} file of {st.st_size} bytes, at most {limit} ({limit_name})")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CorruptImageError(path, REASON_CORRUPT_IMAGE, f"unreadable ({type(e).__name__}: {e.strerror})") from e
    if len(data) > limit:  # grew since the stat
        raise ImageTooLargeError(path, REASON_TOO_LARGE, f"{what} file over {limit} bytes ({limit_name})")
    return data


def check_pixels(im: Image.Image, path: str | os.PathLike[str], what: str = "image") -> None:
    """Raise :class:`ImageTooLargeError` when the size an opened (not yet decoded) image declares
    is over :data:`~perceptio_core.data.limits.MAX_IMAGE_PIXELS`: call it before ``load()``."""
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageTooLargeError(path, REASON_TOO_LARGE,
                                 f"{what} declares {w}x{h} = {w * h} pixels, at most {MAX_IMAGE_PIXELS} "
                                 "(MAX_IMAGE_PIXELS)")


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
        raise MissingImageError(path, REASON_MISSING_IMAGE) from e


def bomb_error(path: str | os.PathLike[str], e: Exception, what: str = "image") -> ImageTooLargeError:
    """The :class:`ImageTooLargeError` for PIL's own refusal (``DecompressionBombError``, raised by
    ``Image.open`` itself past twice its limit): quarantined as too large, like :func:`check_pixels`."""
    return ImageTooLargeError(path, REASON_TOO_LARGE, f"{what} declares more than {MAX_IMAGE_PIXELS} pixels "
                                                      f"(MAX_IMAGE_PIXELS; {type(e).__name__}: {e})")


def decode_image_bytes(data: bytes, path: str | os.PathLike[str]) -> tuple[Image.Image, str]:
    """Verify and fully decode image bytes; returns (loaded image, format). ``path`` only names
    the image in the :class:`CorruptImageError` raised when the bytes are not a complete image, and
    in the :class:`ImageTooLargeError` raised (before decoding) when it declares too many pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                check_pixels(probe, path)
                probe.verify()  # structure and checksums (PNG CRCs)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or ""
            im.load()  # full decode: catches truncated files
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise bomb_error(path, e) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise CorruptImageError(path, REASON_CORRUPT_IMAGE, _plain(e)) from e
    return im, fmt


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")


def _plain(e: BaseException) -> str:
    """An error in words for a quarantine reason: its type and message, less the memory addresses of
    the objects it names (PIL's "cannot identify image file <_io.BytesIO object at 0x...>")."""
    text = _OBJECT_REPR.sub("", str(e)).strip()
    if isinstance(e, Image.UnidentifiedImageError) or text == "cannot identify image file":
        return f"{type(e).__name__}: not an image PIL can identify (unknown format, or not image bytes)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read(path: str | os.PathLike[str]) -> bytes:
    return read_regular(path)


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
