"""glibc's allocator, set for a server whose requests are large and sometimes refused.

What a request's decoding frees stays in the process as free heap, for the next request to
reuse. After a refusal there may be no next one, so `release_soon` has a thread hand that free
memory back to the system (`malloc_trim`), at most once per TRIM_INTERVAL_SECONDS (the next
request faults its pages in again). `malloc_trim` cannot shrink the heap of an arena other than
the main one, and by default each thread that allocates (gRPC's, the codec threads) may get an
arena of its own, so `tune_allocator`, run before the server starts its threads, keeps them all
in the main arena. Elsewhere than glibc, both do nothing. See BENCHMARKS.md, memory after
refused requests: with neither, 120 refused 24 MiB requests left 0.28 GB in the process.
"""

import ctypes
import os
import threading
import time

M_ARENA_MAX = -8  # mallopt parameter (malloc.h)
TRIM_INTERVAL_SECONDS = 1.0

_libc = None
_trimmer: "_Trimmer | None" = None
_lock = threading.Lock()


class _Trimmer:
    """malloc_trim(0) on a thread of its own when asked, at most once per interval; a request
    during the interval is served when it ends."""

    def __init__(self, libc):
        self._libc = libc
        self._wanted = threading.Event()
        threading.Thread(target=self._run, name="cispo-malloc-trim", daemon=True).start()

    def request(self) -> None:
        self._wanted.set()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            self._libc.malloc_trim(0)
            time.sleep(TRIM_INTERVAL_SECONDS)


def tune_allocator() -> bool:
    """One malloc arena for every thread, unless the environment sets the arenas
    (MALLOC_ARENA_MAX, or arena_max in GLIBC_TUNABLES), and `release_soon` enabled. Call it
    first thing in the process (an arena a thread already has stays). False where the C library
    is not glibc."""
    global _libc
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt, _ = libc.mallopt, libc.malloc_trim  # glibc's own
    except (OSError, AttributeError):
        return False
    chosen = "MALLOC_ARENA_MAX" in os.environ or "arena_max" in os.environ.get("GLIBC_TUNABLES", "")
    if not (chosen or mallopt(M_ARENA_MAX, 1)):
        return False
    _libc = libc
    return True


def release_soon() -> None:
    """Hand the memory free inside the allocator back to the system soon, on another thread
    (after a refused request); nothing unless `tune_allocator` ran."""
    global _trimmer
    if _libc is None:
        return
    with _lock:
        if _trimmer is None:
            _trimmer = _Trimmer(_libc)
    _trimmer.request()
