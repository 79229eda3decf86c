"""Progress for long stage steps, shown once: on a terminal a tqdm bar, with a log line every 10%
going to the Prefect UI only; elsewhere (a log file, CI, a worker) no bar, and the 10% lines on the
console too (the Prefect logger, so the UI shows them either way). Core functions take a
``progress(done, total, info)`` callback."""

from __future__ import annotations

import logging
from typing import Any

from tqdm.auto import tqdm

PROGRESS_ATTR = "perceptio_progress"  # a log record's flag: a progress line (the bar shows it on a terminal)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, (int, float)) else str(v)


class _NoProgressLines(logging.Filter):
    """On a console handler while a bar is drawn: drops the progress lines (the bar shows them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, PROGRESS_ATTR, False)


_FILTER = _NoProgressLines()


def _console_handlers() -> list[logging.Handler]:
    """The handlers that write to a terminal stream (the Prefect console handler among them), not
    files and not Prefect's API handler."""
    loggers = [logging.getLogger()] + [lg for name, lg in logging.Logger.manager.loggerDict.items()
                                       if isinstance(lg, logging.Logger) and name.split(".")[0] == "prefect"]
    out = []
    for lg in loggers:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and \
                    hasattr(stream, "isatty") and stream.isatty():
                out.append(h)
    return out


class Progress:
    """A ``progress(done, total, info)`` callback; ``close()`` when finished (module docstring)."""

    def __init__(self, desc: str, log: logging.Logger | logging.LoggerAdapter, every: float = 0.1):
        self.desc, self.log, self.every = desc, log, every
        self.bar: Any = None
        self._k = 1  # the next line is due at k * every (counted, so 3 * 0.1 is no float short of 0.3)

    def __call__(self, done: int, total: int, info: dict[str, float] | None = None) -> None:
        if self.bar is None:
            # disable=None: no bar unless stderr is a terminal
            self.bar = tqdm(total=total, desc=self.desc, leave=False, dynamic_ncols=True, disable=None)
            if not self.bar.disable:
                for h in _console_handlers():
                    if _FILTER not in h.filters:
                        h.addFilter(_FILTER)
        self.bar.update(done - self.bar.n)
        if info:
            self.bar.set_postfix({k: _fmt(v) for k, v in info.items()}, refresh=False)
        frac = done / max(total, 1)
        if frac >= self._k * self.every - 1e-9 or done == total:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in (info or {}).items())
            self.log.info("%s: %d/%d (%.0f%%) %s", self.desc, done, total, 100 * frac, extra,
                          extra={PROGRESS_ATTR: True})
            while self._k * self.every <= frac + 1e-9:
                self._k += 1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["PROGRESS_ATTR", "Progress"]
