"""One long-lived thread that runs CPU expert work while the thread that submitted it goes on
(with the shared experts, say): jobs run in submission order, and a job's `wait()` returns its
result or re-raises what it raised. The Numba kernels release the GIL, so both threads compute
at once."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Any

import numba
from numba.np.ufunc.parallel import _launch_threads


class WorkerHandle:
    """A job on the worker: `wait()` blocks until it ran, then returns its result or raises its
    exception (the same object, so its type and the worker's traceback survive)."""

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self._fn, self._args = fn, args
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._result = self._fn(*self._args)
        except BaseException as error:  # handed to wait(); the worker lives on
            self._error = error
        finally:
            self._fn = self._args = None  # the inputs are not kept alive by a finished job
            self._done.set()

    def wait(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class ExpertWorker:
    """A daemon thread taking jobs from a queue, one at a time."""

    def __init__(self, name: str = "hetero-experts") -> None:
        self._jobs: queue.SimpleQueue[tuple[WorkerHandle, int]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> WorkerHandle:
        """Queue fn(*args); its Numba kernels use as many threads as the submitting thread's
        (Numba's thread count is a per-thread setting, `hetero.load(threads=...)` sets it in
        the caller's)."""
        handle = WorkerHandle(fn, args)
        self._jobs.put((handle, numba.get_num_threads()))
        return handle

    def _run(self) -> None:
        while True:
            handle, threads = self._jobs.get()
            if numba.get_num_threads() != threads:
                numba.set_num_threads(threads)
            handle.run()


_worker: ExpertWorker | None = None
_worker_lock = threading.Lock()


def _forget_worker() -> None:
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


# a forked child has no copy of the worker thread: it starts its own at its first submit
os.register_at_fork(after_in_child=_forget_worker)


def expert_worker() -> ExpertWorker | None:
    """The process's worker, started at first use; None where Numba's threading layer cannot
    take parallel kernels from two threads at once (its fallback "workqueue" aborts the
    process; "omp" and "tbb" can), and the experts then run in the caller's thread."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _launch_threads()  # picks the layer, so that threading_layer() can name it
            if numba.threading_layer() == "workqueue":
                return None
            _worker = ExpertWorker()
        return _worker
