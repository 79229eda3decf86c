"""Progress for long stage steps: a tqdm bar on the terminal and a log line every 10% (the Prefect
logger, so the UI shows it too). Core functions take a ``progress(done, total, info)`` callback."""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


class Progress:
    """A ``progress(done, total, info)`` callback; ``close()`` when finished."""

    def __init__(self, desc: str, log: logging.Logger | logging.LoggerAdapter, every: float = 0.1):
        self.desc, self.log, self.every = desc, log, every
        self.bar: Any = None
        self._next = every

    def __call__(self, done: int, total: int, info: dict[str, float] | None = None) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if info:
            self.bar.set_postfix({k: _fmt(v) for k, v in info.items()}, refresh=False)
        frac = done / max(total, 1)
        if frac >= self._next or done == total:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in (info or {}).items())
            self.log.info("%s: %d/%d (%.0f%%) %s", self.desc, done, total, 100 * frac, extra)
            while self._next <= frac:
                self._next += self.every

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
