"""Errors that SegLens reports to its users.

Every problem with user input is raised as a :class:`SegLensError` whose message names the file and the
problem, so that the command line, the Slicer module and the Python console can show it as it is.
"""

from __future__ import annotations

from pathlib import Path


class SegLensError(Exception):
    """A problem with the user's input or environment, stated in words a user can act on."""


class InputFileError(SegLensError, ValueError):
    """A file the user handed us is missing, unreadable or does not hold what it should."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary (sweep workers, Ray)
        return type(self), (self.path, self.problem)


class OutputExistsError(SegLensError, FileExistsError):
    """An output would replace an existing file; SegLens never does that unless asked to (``overwrite``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{self.path}: already exists; choose another output or pass --overwrite")

    def __reduce__(self):
        return type(self), (self.path,)


def refuse_existing(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` when ``path`` exists and ``overwrite`` is False; returns the path.

    Outputs check this before any work, so a refused overwrite costs nothing.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(path)
    return path
