"""One persistent daemon worker thread for model calls, with per-phase progress and Cancel.

Model work (loading, segmenting, previews, Apply) runs on a single long-lived thread, as SlicerNNInteractive does:
CUDA and cuDNN caches are per thread, so hopping threads between calls makes every call slow. The thread is a
daemon, so closing Slicer while a job runs does not wait for the job. The worker gets numpy in and gives numpy out;
it never touches Qt or MRML.

The panel never waits for a job in a nested event loop (that let a second click start a second job while the first
ran). It submits a :class:`Job` and polls it from a timer on the main thread: while the job runs every control that
starts work is disabled, and the job's result is shown, or dropped when it is stale, once it is done.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class Cancelled(Exception):
    """The user pressed Cancel (raised by :meth:`Progress.check` for jobs that poll the flag themselves)."""


class Progress:
    """Progress of a job, written by the worker and read by the main thread; also the Cancel flag.

    Pass :meth:`callback` as a SegLensLogic ``progress`` argument: it records ``(done, total)`` and returns False
    once :meth:`cancel` was called, which SegLensLogic answers by stopping between two batches of slices
    (``PredictionCancelled``). ``phase`` names the step the numbers count (``"step 1 of 2: running the model over the slices"``);
    ``done`` and ``total`` always count within that step.
    """

    def __init__(self, phase: str = "") -> None:
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.done = 0
        self.total = 0
        self.phase = phase

    def callback(self, done: int, total: int, phase: str | None = None) -> bool:
        """Record progress (within ``phase`` when given); False asks the caller to stop."""
        with self._lock:
            self.done, self.total = int(done), int(total)
            if phase is not None:
                self.phase = phase
        return not self._cancel.is_set()

    def start(self, phase: str) -> bool:
        """Begin a step whose size is not known yet (the bar shows "busy"); False when cancelled."""
        return self.callback(0, 0, phase)

    def check(self) -> None:
        """Raise :class:`Cancelled` if Cancel was pressed."""
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def snapshot(self) -> tuple[str, int, int]:
        """``(phase, done, total)`` read together."""
        with self._lock:
            return self.phase, self.done, self.total

    @property
    def percent(self) -> int:
        """0-100 within the current phase; 0 while its size is unknown."""
        with self._lock:
            return int(round(100.0 * self.done / self.total)) if self.total else 0


class Worker:
    """A single daemon thread running submitted calls in order; :meth:`submit` returns the call's ``Future``."""

    def __init__(self, name: str = "SegLens") -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, function, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = function(*args, **kwargs)
            except BaseException as exc:  # handed to the main thread, which reports it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def submit(self, function: Callable[..., Any], *args, **kwargs) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("the SegLens worker thread has stopped")
        future: Future = Future()
        self._queue.put((future, function, args, kwargs))
        return future

    def run(self, function: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``function`` on the worker and block until it is done (scripts and tests; the panel polls)."""
        return self.submit(function, *args, **kwargs).result()

    def shutdown(self) -> None:
        """Stop after the job in progress (queued jobs are cancelled); does not wait."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._queue.put(None)


class Job:
    """A call submitted to the worker, as the panel tracks it.

    Attributes:
        kind: what it does (``segment``, ``table``, ``heatmaps``, ``preview``, ``apply``, ``suggest``, ``recipe``).
        future: the worker's ``Future``.
        progress: its :class:`Progress` (also the Cancel flag).
        done: ``done(result)`` on the main thread once it succeeded (not called when cancelled or stale).
        key: what the result depends on; a result whose key is no longer current is dropped.
        cancellable: whether Cancel applies (a job that cannot stop early is still dropped when cancelled).
        discard: ``discard(result)`` when a finished job's result is dropped (cancelled after its last check, or
            orphaned): undoes what the job changed, so that Cancel leaves things as they were.
    """

    def __init__(self, kind: str, future: Future, progress: Progress, done: Callable[[Any], None], key: Any = None,
                 cancellable: bool = True, discard: Callable[[Any], None] | None = None) -> None:
        self.kind = kind
        self.future = future
        self.progress = progress
        self.done = done
        self.key = key
        self.cancellable = cancellable
        self.discard = discard
        self.orphaned = False  # the scene closed or the session changed: drop the result whatever it is

    def cancel(self) -> None:
        self.progress.cancel()

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled
