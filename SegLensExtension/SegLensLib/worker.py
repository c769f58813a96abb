"""One persistent worker thread for model calls, with progress and Cancel.

Model work (loading, segmenting, previews) runs on a single long-lived thread, as SlicerNNInteractive does: CUDA
and cuDNN caches are per thread, so hopping threads between calls makes every call slow. The worker gets numpy in
and gives numpy out; it never touches Qt or MRML. The main thread waits with :func:`wait`, pumping the
application's events between short waits so that Slicer stays responsive and the progress bar moves.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before Python 3.11
from typing import Any, Callable


class Cancelled(Exception):
    """The user pressed Cancel (raised by :meth:`Progress.check` for jobs that poll the flag themselves)."""


class Progress:
    """Progress of a job, written by the worker and read by the main thread; also the Cancel flag.

    Pass :meth:`callback` as a SegLensLogic ``progress`` argument: it records ``(done, total)`` and returns False
    once :meth:`cancel` was called, which SegLensLogic answers by stopping between two batches of slices
    (``PredictionCancelled``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self.done = 0
        self.total = 0
        self.message = ""

    def callback(self, done: int, total: int, message: str | None = None) -> bool:
        """Record progress; False asks the caller to stop."""
        with self._lock:
            self.done, self.total = int(done), int(total)
            if message is not None:
                self.message = message
        return not self._cancel.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if Cancel was pressed."""
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def percent(self) -> int:
        """0-100; 0 while the total is unknown."""
        with self._lock:
            return int(round(100.0 * self.done / self.total)) if self.total else 0


class Worker:
    """A single daemon worker thread; :meth:`submit` queues a call and returns its ``Future``."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="SegLens")

    def submit(self, function: Callable[..., Any], *args, **kwargs) -> Future:
        return self._executor.submit(function, *args, **kwargs)

    def run(self, function: Callable[..., Any], *args, pump: Callable[[], None] | None = None,
            on_progress: Callable[[], None] | None = None, interval: float = 0.03, **kwargs) -> Any:
        """Run ``function`` on the worker and wait for it (see :func:`wait`); returns its result or re-raises."""
        return wait(self.submit(function, *args, **kwargs), pump=pump, on_progress=on_progress, interval=interval)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def wait(future: Future, pump: Callable[[], None] | None = None, on_progress: Callable[[], None] | None = None,
         interval: float = 0.03) -> Any:
    """Wait for ``future`` on the main thread, calling ``pump`` (``slicer.app.processEvents``) and ``on_progress``
    every ``interval`` seconds; returns the result or re-raises the worker's exception here.

    Short timed waits release the GIL; a tight event loop would starve the worker.
    """
    while True:
        try:
            return future.result(timeout=interval)
        except FutureTimeout:
            pass
        if on_progress is not None:
            on_progress()
        if pump is not None:
            pump()
        else:
            time.sleep(0)
