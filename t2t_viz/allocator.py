"""Keep freed activation memory in the process so the next forward pass reuses it.

A capture keeps every layer's output alive until the pass ends, so PyTorch's CPU tensors cannot reuse each
other's memory within the pass. With glibc's defaults the freed memory is handed back to the kernel after
each pass (trimmed or unmapped), and the next pass page-faults all of it in again: on ResNet50 at 224 that
alone costs about 10% of the forward time. Raising glibc's mmap and trim thresholds keeps it in the heap.

The mmap threshold stays at 4 MiB: every activation of the default models at 224 is smaller and is
reused from the heap, while the maps of high-resolution inputs (tens to hundreds of MiB at 1024-2048)
get their own mappings, returned to the kernel when freed. Kept in the heap, they fragmented it: a
ViT-L/16 capture at 1024 grew the process by 645 MiB where 193 MiB were live at the peak
(``benchmarks/memory_estimate.py``).

The setting is process-wide, so the entry points (CLI, app, benchmarks) call :func:`reuse_freed_memory`;
the library never changes it on import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading

__all__ = ['reuse_freed_memory', 'MMAP_THRESHOLD_BYTES', 'TRIM_THRESHOLD_BYTES']

_logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 ** 2  # larger blocks (high-resolution maps) get their own mmap, returned on free
TRIM_THRESHOLD_BYTES = 1024 ** 3  # free heap kept before glibc gives memory back to the kernel

_lock = threading.Lock()
_applied = False


def reuse_freed_memory() -> bool:
    """Tune glibc's malloc once for repeated forward passes; True if the setting is in effect.

    Does nothing (False) where the C library is not glibc, e.g. on macOS or Windows or with musl.
    """
    global _applied
    with _lock:
        if _applied:
            return True
        if not sys.platform.startswith('linux'):
            return False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
            mallopt = libc.mallopt
        except (OSError, AttributeError):
            _logger.debug('no glibc mallopt; the allocator keeps its defaults')
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        return _applied
