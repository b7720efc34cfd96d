"""The process's C heap (glibc's malloc), tuned for serving: what a large model's forward frees is kept
for the next one, and what a huge decode freed is handed back at once. Nothing happens under another
C library.

Why keep: a forward on the CPU allocates its intermediate tensors afresh, and glibc serves every block
over its mmap threshold (at most 32 MiB) with pages of its own, handed back to the system when freed,
and hands back a heap's free top past its trim threshold. The next forward touches those pages new:
eca_halonext26ts at batch 8 took 33,000 page faults (128 MiB of zeroed pages) per forward, 16% of its
time (docs/performance.md). ONNX Runtime keeps its own arena for the same reason. Not for a small
model: the shipped one served x0.93-0.96 the images/s with it (docs/performance.md)."""
import ctypes
import logging
from typing import Callable, Optional

log = logging.getLogger("halo.heap")

# mallopt's parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_NEVER = 2 ** 31 - 1  # mallopt takes an int: the largest "free memory at the heap's top to keep"


def _libc_function(name: str) -> Optional[Callable[..., int]]:
    """``name`` from the C library the process already runs, or None where it has none (not glibc)."""
    return getattr(ctypes.CDLL(None), name, None)


def keep_freed_memory() -> bool:
    """From now on, in every thread, blocks of any size come from the heaps (none mapped on its own) and
    a heap's free top is never handed back by itself: a forward reuses the pages the previous one freed.
    The process holds the most that its forwards needed at once (``release_free_memory`` still hands
    back what is free). Whether it took effect (False: not glibc)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        log.info("the C library has no mallopt: freed memory goes back to the system as it decides")
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))


def release_free_memory() -> None:
    """Hands the heap's free memory back to the system (glibc's malloc_trim; nothing elsewhere).
    The decoding threads' heaps keep what large images used after they are freed: four requests of
    big images left the process at 2 GB where it serves in a few hundred MB."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
