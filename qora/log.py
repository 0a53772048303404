"""How qora reports: module loggers under "qora"; what reaches the terminal is decided here.

Library code does not print. It logs to its module's logger (`logging.getLogger(__name__)`):

- warning: something the user should know now (the GPU is not used, the GPU failed mid-answer);
- info: progress of a long step (the demo model's download and conversion, a pull);
- debug: facts for --verbose (device memory, why the CPU runs the model, load time).

Long steps also take a progress callback where a caller wants the lines itself.

The "qora" logger has one handler of its own, `HANDLER`, which writes `qora: <message>` to stderr,
so a program using qora hears its warnings as the command line does. It shows warnings; the
command line (`cli_session()`, then `configure(verbose)`) shows progress too, and everything under -v.
`verbose()` shows the debug lines of the current thread for the length of a block (what
qora.load(verbose=True) asks for). The logger does not propagate: an application that routes logs
itself sets `logging.getLogger("qora").propagate = True` and removes `HANDLER`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys

ROOT = logging.getLogger("qora")
_VERBOSE = contextvars.ContextVar("qora_verbose", default=False)


class StderrHandler(logging.Handler):
    """`qora: <message>` on the stderr of the moment (front ends and tests replace sys.stderr), for
    records at `threshold` or above, and every record inside a `verbose()` block."""

    def __init__(self, threshold: int = logging.WARNING):
        super().__init__(logging.DEBUG)  # the threshold is applied in filter(), which verbose() can lift
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= self.threshold or _VERBOSE.get()) and bool(super().filter(record))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            if stream is None:  # pythonw: no console
                return
            stream.write(f"qora: {self.format(record)}\n")
            stream.flush()
        except Exception:
            self.handleError(record)


HANDLER = StderrHandler()
for _old in [h for h in ROOT.handlers if type(h).__name__ == "StderrHandler"]:  # a reloaded module's
    ROOT.removeHandler(_old)
ROOT.addHandler(HANDLER)
ROOT.setLevel(logging.DEBUG)  # records are made; HANDLER decides what is shown
ROOT.propagate = False


def configure(verbose: bool = False) -> None:
    """For a command-line entry point: warnings and progress on stderr, and debug lines with -v."""
    HANDLER.threshold = logging.DEBUG if verbose else logging.INFO


@contextlib.contextmanager
def cli_session():
    """A command-line run (qora.cli.main): progress lines shown, configure() free to show more, and
    the library's default (warnings only) back afterwards, for a program that called it in-process."""
    saved = HANDLER.threshold
    configure()
    try:
        yield
    finally:
        HANDLER.threshold = saved


@contextlib.contextmanager
def verbose(on: bool = True):
    """Within the block, this thread's debug lines are shown too (when `on`)."""
    token = _VERBOSE.set(_VERBOSE.get() or on)
    try:
        yield
    finally:
        _VERBOSE.reset(token)
