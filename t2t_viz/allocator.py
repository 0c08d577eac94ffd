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

Batched passes at the usual input sizes are the other way round. ``t2t-viz stats`` runs 8 images at once, and
at 224 a batch's activations are 4-26 MiB each (ResNet50's stem output is 25.7 MiB): with a 4 MiB threshold
every one of them was a fresh mapping, faulted in page by page on every pass (124-272 thousand page faults
per ResNet50 batch, 73-95 ms per image against 59-60 ms under glibc's defaults). For inputs up to
``BATCHED_SIZES_UP_TO`` the statistics command therefore raises the threshold to 32 MiB, glibc's own ceiling
for the threshold it adapts by default: those blocks are then reused whole, with no page faults, for at most
11% more peak RSS (ResNet50 and T2T-ViT-24 at 224, ViT-L/16 at 384, batch 8). At 1024 the same setting
raised T2T-ViT-24's peak RSS from 1.37 to 2.49 GiB, so larger inputs keep 4 MiB.

The setting is process-wide, so the entry points (CLI, app, benchmarks) call :func:`reuse_freed_memory`;
the library never changes it on import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import threading
from typing import Optional

__all__ = ['reuse_freed_memory', 'batched_mmap_threshold', 'MMAP_THRESHOLD_BYTES', 'BATCHED_MMAP_THRESHOLD_BYTES',
           'BATCHED_SIZES_UP_TO', 'TRIM_THRESHOLD_BYTES']

_logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 ** 2  # larger blocks (high-resolution maps) get their own mmap, returned on free
BATCHED_MMAP_THRESHOLD_BYTES = 32 * 1024 ** 2  # the statistics' batches at the usual input sizes
BATCHED_SIZES_UP_TO = 384  # the largest input side given that threshold
TRIM_THRESHOLD_BYTES = 1024 ** 3  # free heap kept before glibc gives memory back to the kernel

_lock = threading.Lock()
_applied: Optional[int] = None  # the mmap threshold in effect


def batched_mmap_threshold(img_size: int) -> int:
    """The mmap threshold for batched statistics of inputs of ``img_size`` pixels a side."""
    return BATCHED_MMAP_THRESHOLD_BYTES if img_size <= BATCHED_SIZES_UP_TO else MMAP_THRESHOLD_BYTES


def reuse_freed_memory(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Tune glibc's malloc for repeated forward passes: freed blocks under ``mmap_threshold`` bytes stay in
    the heap for the next pass; True if the setting is in effect. A later call may change the threshold.

    Does nothing (False) where the C library is not glibc, e.g. on macOS or Windows or with musl.
    """
    global _applied
    with _lock:
        if _applied == mmap_threshold:
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
        if not (mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
            return False
        _applied = mmap_threshold
        return True
