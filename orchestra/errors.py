"""Every error orchestra raises on purpose, under one root.

A caller (the CLI, a notebook, a test) catches `OrchestraError` and shows
its message; `exit_code` is what the CLI exits with. Anything else that
escapes is a bug, and keeps its traceback.

    OrchestraError                 exit 2: bad input, nothing was started
    ├── SpecError                  a spec that cannot run: every (field, message)
    ├── FieldError                 one spec field whose files or names fail when used
    ├── StorageError               a job folder or record that is not there or not readable
    │   └── StorageWriteError      a write the storage refused (also an OSError)
    ├── JobStateError              a job in the wrong state for the verb (resume a running job)
    ├── ClusterError               a Ray cluster that cannot be reached or refuses us
    ├── BoardError                 TensorBoard cannot serve what was asked
    └── KerasVersionError          the Keras that is installed is not the one orchestra needs
"""

from __future__ import annotations

import difflib
from pathlib import Path

EXIT_BAD_INPUT = 2


class OrchestraError(Exception):
    """The root of orchestra's errors; `exit_code` is the CLI's."""

    exit_code = EXIT_BAD_INPUT


class SpecError(OrchestraError):
    """A spec that cannot run; `problems` are (field path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"{source}: invalid job spec"] + [f"  {printable(path)}: {printable(msg)}" for path, msg in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # raised on a worker, it travels to the driver pickled
        return type(self), (self.problems, self.source)


class FieldError(OrchestraError, ValueError):
    """A spec field whose files or names turn out wrong when they are used
    (a folder that is not there, a weights file that does not fit);
    `field` is its spec path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)

    def __reduce__(self):  # raised on a worker, it travels to the driver pickled
        return type(self), (self.field, str(self))

    def as_spec_error(self, source: str = "spec") -> SpecError:
        return SpecError([(self.field, str(self))], source)


class StorageError(OrchestraError):
    """A job, record or file the storage does not have, or cannot give."""


class StorageWriteError(StorageError, OSError):
    """A write to the storage failed (disk full, read-only, gone); the
    message names the path (also `filename`). What was there before is
    left as it was."""

    @classmethod
    def of(cls, path: Path, error: OSError) -> StorageWriteError:
        return cls(error.errno, f"cannot write {path}: {error.strerror or error}", str(path))

    def __str__(self) -> str:
        return self.strerror


class JobStateError(OrchestraError):
    """The job is in a state the verb cannot act on (e.g. resuming a job
    that is RUNNING, loading the model of a job that has none)."""


class ClusterError(OrchestraError):
    """The cluster cannot be reached, refuses us, or does not know the job."""


class BoardError(OrchestraError):
    """TensorBoard cannot serve what was asked (no such job, port taken)."""


class KerasVersionError(OrchestraError):
    """tf-keras (Keras 2) is missing, or tf.keras resolves to Keras 3."""


def printable(text: str) -> str:
    """Text as one printable line: control characters (a newline in a key,
    say) are shown escaped, not obeyed by the terminal."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def close_match(name: str, allowed: list[str]) -> str | None:
    """The one name of `allowed` closest to a misspelt `name`, for "did you
    mean" hints (difflib's ratio of at least 0.6), or None.

        >>> close_match("patiense", ["monitor", "patience"])
        'patience'
    """
    found = difflib.get_close_matches(str(name), allowed, n=1)
    return found[0] if found else None
