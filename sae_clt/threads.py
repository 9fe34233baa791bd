"""Background threads (the loader's prefetch, the GPU staging's copies: ``prefetched``) that use
torch without competing with the main thread's parallel work.

torch's CPU build runs parallel ops on OpenMP. An op called from a second Python thread starts a
second OpenMP team of its own, sized like the main one: on a 2-core machine the prefetch thread's
few indexing ops then run two more threads beside the training step's two, and a step whose
parallel loops wait at a barrier for a descheduled worker pays for it. The work these threads do
is small and can run on the thread itself.

``torch.set_num_threads`` cannot be used for this: it also sets the count torch gives every thread
(measured: the training step itself fell to one thread, 95 against 55 ms). OpenMP's own
``omp_set_num_threads`` changes the calling thread's count only.
"""

from __future__ import annotations

import ctypes
import queue
import re
import threading
from functools import lru_cache
from typing import Iterator


@lru_cache(maxsize=1)
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (found in its memory map; torch's first, since
    other packages, e.g. scikit-learn, may bring their own copy), or none where they cannot be
    found (not Linux, another parallel backend)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = re.findall(r"(/\S*lib(?:gomp|iomp5|omp)[^/\s]*\.so[^/\s]*)", maps.read())
    except OSError:
        return ()
    runtimes = []
    for path in sorted(dict.fromkeys(paths), key=lambda p: "/torch/" not in p):
        try:
            runtime = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            runtime.omp_set_num_threads  # noqa: B018 - the symbol must be there
            runtimes.append(runtime)
        except (OSError, AttributeError):
            continue
    return tuple(runtimes)


def use_one_torch_thread() -> bool:
    """Make torch ops called from the current thread run on this thread alone, leaving every other
    thread's count as it is. Call it first thing in a background thread. Returns whether it took
    effect (False where torch does not parallelise with OpenMP or its runtime is not found: the
    thread then works as before)."""
    import torch

    # torch sets a thread's OpenMP count on that thread's first use (from the global setting);
    # trigger that first so it does not undo the count set below.
    torch.get_num_threads()
    for runtime in _openmp_runtimes():
        runtime.omp_set_num_threads(1)  # this thread's count in that runtime only
        if torch.get_num_threads() == 1:  # the runtime torch uses
            return True
    return False


def prefetched(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate ``items`` on a background thread, preparing at most ``depth`` items beyond the
    one being consumed (so memory holds depth + 1 items). Errors raised there are raised
    here; stopping early stops the thread."""

    ready: queue.Queue = queue.Queue()
    permits = threading.Semaphore(depth)  # released when the consumer takes an item
    stop = threading.Event()

    def produce() -> None:
        try:
            use_one_torch_thread()  # its indexing ops must not start a second OpenMP team beside the step's
            iterator = iter(items)
            while True:
                while not permits.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    ready.put(("end", None))
                    return
                ready.put(("item", item))
                del item
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            ready.put(("error", exc))

    thread = threading.Thread(target=produce, name="saeclt-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            permits.release()
            yield value
            del value
    finally:
        stop.set()
        thread.join(timeout=5)
