"""Resumable multi-step runs (the demo and the reference build): a JSON state file that records each finished step.

A run lives in one output folder. Each step works in its own subfolder (``name``, or ``NN-name`` when the run is
``numbered``) and is recorded in ``OUT/<state file>`` (with its outputs, seconds and finish time) only once it has
finished, so an interrupted run continues where it stopped: finished steps are skipped, and an unfinished step
starts again. A step whose work is itself resumable (segmenter training with ``resumable=True``, an SAE sweep
that keeps every SAE it trained) is handed its folder as the previous attempt left it; any other step starts
afresh, in a hidden ``.<folder>.tmp`` renamed into place when it finishes if the run is ``staged`` (so a step
folder is never half written), else in its emptied folder. The options of a run are stored with it; rerunning
with other options is refused unless the caller starts over.

State file: ``{"kind", "format_version", "options", "started", "finished", "steps": {name: {"folder",
"seconds", "finished", "outputs"}}}``.
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
from ..storage import Schema, atomic_write_json, check_document, publish_folder, read_json

PIPELINE_FORMAT_VERSION = 1


class StepRecord(Schema):
    """A finished step: its folder (a plain name inside the run's folder), seconds, finish time and outputs."""

    folder: str = Field(pattern=r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
    seconds: float = Field(ge=0)
    finished: str | None = None
    outputs: dict[str, Any]


class RunState(Schema):
    """A resumable run's state file: options and finished steps (subclassed to type a run's options)."""

    options: dict[str, Any] | None
    steps: dict[str, StepRecord]
    started: str | None = None
    finished: str | None = None


def now_utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """``12.3 s`` under two minutes, else ``4.5 min``."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


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
        label: what the run is called in messages (``"SegLens demo"``).
        format_version: the state file's version (a state of another version is refused).
        document: the state file's schema (:class:`RunState` or a subclass typing the options).
        numbered: step folders ``01-name``, ``02-name``... instead of ``name``.
        staged: non-resumable steps write into ``.<folder>.tmp``, renamed into place when they finish.
        describe_options: options as the user gave them (``"--quick, --hook up_3"``), for the message refusing
            other options; default: the names of the options that differ.
        defaults: every option's default (nested as ``options``): a run started by an earlier version continues
            when the options it lacks are at these defaults; without ``defaults`` the options must match exactly.
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
        *,
        label: str = "SegLens run",
        format_version: int = PIPELINE_FORMAT_VERSION,
        document: type[RunState] = RunState,
        numbered: bool = False,
        staged: bool = False,
        describe_options: Callable[[Any], str] | None = None,
        defaults: dict[str, Any] | None = None,
    ):
        self.out, self.kind, self.steps, self.log = Path(out), kind, steps, log
        self.numbered, self.staged = numbered, staged
        self.path = self.out / state_name
        options = json.loads(json.dumps(options))
        self.data: dict[str, Any] = {"kind": kind, "format_version": format_version, "options": options,
                                     "started": now_utc(), "steps": {}}  # fmt: skip
        if self.out.exists() and not self.out.is_dir():
            raise InputFileError(self.out, "exists and is not a folder")
        if self.path.is_file():
            previous = read_json(self.path)
            if not isinstance(previous, dict) or previous.get("kind") != kind:
                raise InputFileError(self.path, f"is not a {label} state file; choose another output folder")
            if overwrite:
                log(f"--overwrite: starting over in {self.out}")
                for name, _title in steps:
                    for folder in (self._folder_name(name), f".{self._folder_name(name)}.tmp"):
                        shutil.rmtree(self.out / folder, ignore_errors=True)
                self.path.unlink()
            else:
                check_document(previous, self.path, kind, format_version, document, f"{label} state file", versioned="state file")
                self.data = self._resumed(previous, options, label, describe_options, defaults)
        elif self.out.is_dir() and any(self.out.iterdir()):
            raise InputFileError(self.out, f"exists and is not a {label} folder (no {self.path.name}); choose another output folder")
        self.out.mkdir(parents=True, exist_ok=True)

    def _resumed(self, previous: dict, options: dict, label: str, describe: Callable[[Any], str] | None,
                 defaults: dict | None) -> dict:  # fmt: skip
        """The previous state, if it was run with ``options`` (or with all of them but some added since, at their
        defaults)."""
        added = _added_options(previous.get("options") or {}, options, json.loads(json.dumps(defaults))) if defaults else []
        if added:  # options introduced by a later version, at their defaults: the finished steps never read them
            self.log(f"Options added since this run started, taken at their defaults: {', '.join(added)}")
            previous["options"] = options
        if previous.get("options") != options:
            if describe is not None:
                raise SegLensError(f"{self.out} holds a {label} with other options ({describe(previous.get('options'))}); "
                                   f"rerun with those, or add --overwrite to start over with {describe(options)}")  # fmt: skip
            changed = sorted(k for k in set(options) | set(previous.get("options") or {})
                             if options.get(k) != (previous.get("options") or {}).get(k))  # fmt: skip
            raise SegLensError(f"{self.out} holds a {label} with other options ({', '.join(changed)}); "
                               "rerun with the same ones, or start over (--overwrite)")  # fmt: skip
        return previous

    def _folder_name(self, name: str) -> str:
        if not self.numbered:
            return name
        return f"{[n for n, _ in self.steps].index(name) + 1:02d}-{name}"

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

    def redo(self, name: str) -> list[str]:
        """Forget step ``name`` and every later step, so the next :meth:`run` of each runs it again (e.g. the
        bundle after the card's wording changed). Their folders stay until then: a non-resumable step starts from
        an empty folder, a resumable one reuses what it kept (SAEs, checkpoints: kept only for the same options).
        Returns the names forgotten."""
        names = [n for n, _ in self.steps]
        if name not in names:
            raise SegLensError(f"unknown step '{name}'; use one of {', '.join(names)}")
        forgotten = [n for n in names[names.index(name):] if self.data["steps"].pop(n, None) is not None]
        self.data.pop("finished", None)
        self._write()
        return forgotten

    def folder(self, name: str) -> Path:
        return self.out / self._folder_name(name)

    def run(self, name: str, function: Callable[[Path], dict], resumable: bool = False) -> dict:
        """Run step ``name`` (``function(folder) -> outputs``) unless it has finished; record it when it does.

        ``resumable`` steps get their folder as a previous attempt left it; others get an empty one (in a staged
        run, a hidden one renamed into place afterwards; paths in the outputs are recorded under the final name).
        """
        index = [n for n, _ in self.steps].index(name) + 1
        total = len(self.steps)
        prefix = f"[{index:{len(str(total))}d}/{total}] {dict(self.steps)[name]}"
        record = self.done(name)
        if record is not None:
            self.log(f"{prefix}: already done in an earlier run ({duration(record['seconds'])}), skipped")
            return record["outputs"]
        self.log(prefix)
        final = self.folder(name)
        staging = self.staged and not resumable
        work = final.with_name(f".{final.name}.tmp") if staging else final
        for leftover in {final, work} if not resumable else ():  # an interrupted attempt may have left a partial folder
            if leftover.exists():
                shutil.rmtree(leftover)
        work.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        recorded = json.dumps(function(work))
        if staging:
            publish_folder(work, final)
            recorded = recorded.replace(work.name, final.name)
        outputs = json.loads(recorded)
        seconds = time.monotonic() - start
        self.data["steps"][name] = {"folder": final.name, "seconds": round(seconds, 1), "finished": now_utc(), "outputs": outputs}
        self._write()
        self.log(f"    done in {duration(seconds)}")
        return outputs

    def finish(self) -> None:
        """Record that every step has run."""
        self.data["finished"] = now_utc()
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.path, self.data, overwrite=True)


def _added_options(previous: dict, options: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Dotted names of the options in ``options`` that ``previous`` lacks, when each is at its value in
    ``defaults`` and every option ``previous`` has is unchanged (a run resumed by a later version that introduced
    settings); else an empty list."""
    added = []
    for key, value in options.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in previous:
            if not isinstance(defaults, dict) or key not in defaults or default != value:
                return []
            added.append(prefix + key)
        elif isinstance(value, dict) and isinstance(previous[key], dict):
            inner = _added_options(previous[key], value, default if isinstance(default, dict) else {}, f"{prefix}{key}.")
            if not inner and previous[key] != value:
                return []
            added += inner
        elif previous[key] != value:
            return []
    return added if not set(previous) - set(options) else []
