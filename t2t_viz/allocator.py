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

The display copies a capture keeps (float16, at most 128 pixels a side) are the other memory that every pass
allocates afresh: at 1024 they are about 240 MiB for ResNet50, freed when the capture is dropped. From the C
library's allocator they cost a fresh mapping (page faults) for each copy over 4 MiB, and the smaller ones,
alive through the pass, broke the heap into pieces the forward's own activations no longer fit, so that the
forward faulted in fresh pages too. :data:`display_buffers` keeps them outside that heap, in buffers that a
later capture reuses: on ResNet50 at 1024 (4 KB pages, alternating rounds in one process) a capture went
from 1.62x to 1.10x the bare forward pass, with as many page faults as the bare pass (README, Memory).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import mmap
import sys
import threading
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ['reuse_freed_memory', 'batched_mmap_threshold', 'MMAP_THRESHOLD_BYTES', 'BATCHED_MMAP_THRESHOLD_BYTES',
           'BATCHED_SIZES_UP_TO', 'TRIM_THRESHOLD_BYTES', 'ReusedBuffers', 'display_buffers', 'IDLE_BUFFER_BYTES']

_logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 ** 2  # larger blocks (high-resolution maps) get their own mmap, returned on free
BATCHED_MMAP_THRESHOLD_BYTES = 32 * 1024 ** 2  # the statistics' batches at the usual input sizes
BATCHED_SIZES_UP_TO = 384  # the largest input side given that threshold
TRIM_THRESHOLD_BYTES = 1024 ** 3  # free heap kept before glibc gives memory back to the kernel
IDLE_BUFFER_BYTES = 512 * 1024 ** 2  # display copies' buffers kept for reuse while no tensor uses them

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


class ReusedBuffers:
    """Host memory for tensors made again and again at the same sizes, such as the display copies of captures.

    Each buffer is an anonymous mapping of its own, outside the C library's heap. A buffer is in use while any
    tensor made from it (or a view of one) is alive; after that it waits, idle, for the next request of the
    same byte size, so the memory is written again without being faulted in again. Idle buffers are bounded
    by ``max_idle_bytes`` (a buffer freed beyond that is unmapped), and :meth:`release` unmaps them all.
    Safe to use from many threads.
    """

    def __init__(self, max_idle_bytes: int = IDLE_BUFFER_BYTES):
        self.max_idle_bytes = max_idle_bytes
        self._idle: Dict[int, List[mmap.mmap]] = {}  # byte size -> idle buffers of that size
        self._idle_bytes = 0
        self._in_use_bytes = 0
        self._lock = threading.RLock()  # re-entrant: a buffer can come back during a garbage collection

    @property
    def idle_bytes(self) -> int:
        """Bytes of buffers no tensor uses, kept for reuse."""
        return self._idle_bytes

    @property
    def in_use_bytes(self) -> int:
        """Bytes of buffers that tensors alive now were made from."""
        return self._in_use_bytes

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``, in a reused buffer when one of its
        byte size is idle."""
        nbytes = math.prod(shape) * dtype.itemsize
        if not nbytes:
            return torch.empty(tuple(shape), dtype=dtype)
        with self._lock:
            idle = self._idle.get(nbytes)
            buffer = idle.pop() if idle else None
            if buffer is not None:
                self._idle_bytes -= nbytes
            self._in_use_bytes += nbytes
        if buffer is None:
            buffer = mmap.mmap(-1, nbytes)
        lease = np.frombuffer(buffer, np.uint8)  # every tensor made from the buffer keeps this array alive
        weakref.finalize(lease, self._give_back, buffer).atexit = False
        return torch.from_numpy(lease).view(dtype).view(tuple(shape))

    def _give_back(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._in_use_bytes -= len(buffer)
            if self._idle_bytes + len(buffer) <= self.max_idle_bytes:
                self._idle.setdefault(len(buffer), []).append(buffer)
                self._idle_bytes += len(buffer)
        # a buffer not kept is unmapped when its last reference goes, once NumPy has let go of it too

    def release(self) -> int:
        """Unmap every idle buffer; returns the bytes given back to the kernel."""
        with self._lock:
            self._idle.clear()
            released, self._idle_bytes = self._idle_bytes, 0
        return released


display_buffers = ReusedBuffers()  # the display copies captures keep (t2t_viz.capture)
