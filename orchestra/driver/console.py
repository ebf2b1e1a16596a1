"""What a person watching a job sees: a line per epoch and, on a terminal,
a live progress bar for the running epoch.

On a terminal the bar is redrawn in place (about once a second) and
cleared before each epoch's line; elsewhere (a pipe, a log file) the bar is
left out, or written as `@orchestra-progress` lines for a client that
draws it (`--status-lines`).
"""

from __future__ import annotations

import shutil
from typing import TextIO

from orchestra.storage import status_lines
from orchestra.storage.record import JobProgress


class Console:
    """Lines and a progress bar on `out`.

    Args:
        out: where to write.
        progress_lines: off a terminal, write progress as status lines (for clients).
        quiet: write nothing but what `final` is given.
    """

    def __init__(self, out: TextIO, progress_lines: bool = False, quiet: bool = False):
        self.out = out
        self.terminal = _is_terminal(out)
        self.progress_lines = progress_lines
        self.quiet = quiet
        self._bar_shown = False

    def line(self, text: str) -> None:
        if self.quiet:
            return
        self._clear_bar()
        print(text, file=self.out, flush=True)

    def progress(self, progress: JobProgress) -> None:
        if self.quiet:
            return
        if self.terminal:
            width = shutil.get_terminal_size().columns - 1
            self.out.write("\r" + progress.bar()[:width] + "\x1b[K")
            self.out.flush()
            self._bar_shown = True
        elif self.progress_lines:
            print(status_lines.progress_line(progress), file=self.out, flush=True)

    def close(self) -> None:
        self._clear_bar()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.out.write("\r\x1b[K")
            self._bar_shown = False


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
