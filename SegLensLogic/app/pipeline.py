"""Resumable multi-step runs (the reference build): a JSON state file that records each finished step.

A run lives in one output folder. Each step works in its own subfolder and is recorded in ``OUT/<state file>``
(with its outputs, seconds and finish time) only once it has finished, so an interrupted run continues where
it stopped: finished steps are skipped, and an unfinished step is handed its folder again (a step whose work is
itself resumable, such as segmenter training with ``resumable=True``, continues inside it; any other step
starts its folder afresh). The options of a run are stored with it; rerunning with other options is refused
unless the caller starts over.

State file: ``{"kind", "format_version", "options", "started", "steps": {name: {"folder", "seconds",
"finished", "outputs"}}}``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import Field

from ..errors import InputFileError, SegLensError
from ..storage import Schema, atomic_write_json, check_document, read_json

PIPELINE_FORMAT_VERSION = 1


class StepRecord(Schema):
    """A finished step: its folder (a plain name inside the run's folder), seconds, finish time and outputs."""

    folder: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
    seconds: float = Field(ge=0)
    finished: str | None = None
    outputs: dict[str, Any]


class RunState(Schema):
    """A resumable run's state file (this module's and the demo's ``demo.json``): options and finished steps."""

    options: dict[str, Any] | None
    steps: dict[str, StepRecord]
    started: str | None = None
    finished: str | None = None


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Pipeline:
    """A resumable run in ``out``: its options, its finished steps, and the step runner.

    Args:
        out: the run's folder (created when missing).
        kind: the state file's ``kind`` (e.g. ``"seglens-reference-build"``); a folder holding another kind of
            run, or files but no state, is refused.
        state_name: the state file's name inside ``out``.
        options: JSON-able options of the run; a rerun must pass the same ones.
        steps: ``(name, title)`` of every step in order (for numbering and progress).
        overwrite: delete the previous run's step folders and state and start over.
        log: where progress lines go.
    """

    def __init__(
        self,
        out: str | Path,
        kind: str,
        state_name: str,
        options: dict[str, Any],
        steps: list[tuple[str, str]],
        overwrite: bool = False,
        log: Callable[[str], None] = print,
    ):
        self.out, self.kind, self.steps, self.log = Path(out), kind, steps, log
        self.path = self.out / state_name
        options = json.loads(json.dumps(options))
        self.data: dict[str, Any] = {"kind": kind, "format_version": PIPELINE_FORMAT_VERSION, "options": options,
                                     "started": now_utc(), "steps": {}}  # fmt: skip
        if self.out.exists() and not self.out.is_dir():
            raise InputFileError(self.out, "exists and is not a folder")
        if self.path.is_file():
            previous = read_json(self.path)
            if not isinstance(previous, dict) or previous.get("kind") != kind:
                raise InputFileError(self.path, f"is not a {kind} state file; choose another output folder")
            if overwrite:
                log(f"--overwrite: starting over in {self.out}")
                for name, _title in steps:
                    shutil.rmtree(self.out / name, ignore_errors=True)
                self.path.unlink()
            else:
                check_document(previous, self.path, kind, PIPELINE_FORMAT_VERSION, RunState, f"{kind} state file", versioned="state file")
                added = _added_options(previous.get("options") or {}, options)
                if added:  # options introduced by a later version, at their defaults: the finished steps never read them
                    log(f"Options added since this run started, taken at their defaults: {', '.join(added)}")
                    previous["options"] = options
                if previous.get("options") != options:
                    changed = sorted(k for k in set(options) | set(previous.get("options") or {})
                                     if options.get(k) != (previous.get("options") or {}).get(k))  # fmt: skip
                    raise SegLensError(f"{self.out} holds a run with other options ({', '.join(changed)}); "
                                       "rerun with the same ones, or start over (--overwrite)")  # fmt: skip
                self.data = previous
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise InputFileError(self.out, f"exists and holds no {self.path.name}; choose another output folder")
        self.out.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> dict | None:
        """The record of a finished step, or None."""
        record = self.data["steps"].get(name)
        if record is None or not (self.out / record["folder"]).exists():
            return None
        return record

    def outputs(self, name: str) -> dict:
        """A finished step's outputs; raises when the step has not run."""
        record = self.done(name)
        if record is None:
            raise SegLensError(f"step '{name}' of {self.out} has not finished")
        return record["outputs"]

    def folder(self, name: str) -> Path:
        return self.out / name

    def run(self, name: str, function: Callable[[Path], dict], resumable: bool = False) -> dict:
        """Run step ``name`` (``function(folder) -> outputs``) unless it has finished; record it when it does.

        ``resumable`` steps get their folder as a previous attempt left it; others get an empty one.
        """
        index = [n for n, _ in self.steps].index(name) + 1
        title = dict(self.steps)[name]
        prefix = f"[{index}/{len(self.steps)}] {title}"
        record = self.done(name)
        if record is not None:
            self.log(f"{prefix}: done in an earlier run ({record['seconds'] / 60:.1f} min), skipped")
            return record["outputs"]
        self.log(prefix)
        folder = self.folder(name)
        if folder.exists() and not resumable:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        outputs = json.loads(json.dumps(function(folder)))
        seconds = time.monotonic() - start
        self.data["steps"][name] = {"folder": name, "seconds": round(seconds, 1), "finished": now_utc(), "outputs": outputs}
        atomic_write_json(self.path, self.data, overwrite=True)
        self.log(f"    done in {seconds / 60:.1f} min")
        return outputs


def _added_options(previous: dict, options: dict, prefix: str = "") -> list[str]:
    """Dotted names of the options in ``options`` that ``previous`` lacks, when every option ``previous`` has is
    unchanged (a run resumed by a later version that introduced settings); else an empty list."""
    added = []
    for key, value in options.items():
        if key not in previous:
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(previous[key], dict):
            inner = _added_options(previous[key], value, f"{prefix}{key}.")
            if not inner and previous[key] != value:
                return []
            added += inner
        elif previous[key] != value:
            return []
    return added if not set(previous) - set(options) else []
