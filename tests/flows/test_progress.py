"""Progress is shown once: a bar on a terminal with its 10% lines kept off the console (the UI
still gets them), or, without a terminal, the lines and no bar."""

import io
import logging

import tasks.progress as progress
from tasks.progress import Progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def _loggers(name):
    log = logging.getLogger(f"prefect.test_progress.{name}")
    log.propagate = False
    console, api = logging.StreamHandler(_Tty()), logging.StreamHandler(io.StringIO())  # api: not a terminal
    log.handlers = [console, api]
    log.setLevel(logging.INFO)
    return log, console.stream, api.stream


def test_without_a_terminal_the_lines_are_on_the_console_and_there_is_no_bar():
    log, console, api = _loggers("plain")
    p = Progress("fit", log)  # pytest's stderr is no terminal: tqdm draws nothing
    for i in range(1, 11):
        p(i, 10, {"loss": 1.0 / i})
    p.close()
    assert p.bar.disable
    assert console.getvalue().count("fit: ") == 10 and api.getvalue().count("fit: ") == 10


def test_with_a_bar_the_lines_go_to_the_ui_only(monkeypatch):
    class Bar:
        disable, n = False, 0

        def __init__(self, **kw):
            pass

        def update(self, k):
            self.n += k

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setattr(progress, "tqdm", Bar)
    log, console, api = _loggers("bar")
    p = Progress("fit", log)
    for i in range(1, 11):
        p(i, 10)
    log.info("a stage line")
    assert "fit: " not in console.getvalue() and "a stage line" in console.getvalue()
    assert api.getvalue().count("fit: ") == 10
