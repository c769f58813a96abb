"""Console helpers shared by every ``seglens`` command and long-running step: log lines and progress.

They sit on the ground floor so that the library's long steps (training, the demo's steps) print the same way as
the command line; the command line's own argument helpers live in :mod:`SegLensLogic.app.arguments`.
"""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, flush=True)


def progress_printer(label: str):
    """A progress callback printing ``label: done/total`` on one updating line when attached to a terminal."""
    interactive = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if interactive:
            print(f"\r{label}: {done}/{total} slices", end="" if done < total else "\n", file=sys.stderr, flush=True)

    return progress
