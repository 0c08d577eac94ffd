"""How much memory a model and a capture need, derived from what the code really allocates.

The estimate is not a formula: the very code that runs (``capture.run`` or the notebook procedure, with
the same options) is executed once on the *meta* device, where tensors have shapes but no data, while a
dispatch mode counts the bytes of every tensor the operations create and frees them as they die. That
gives, without allocating anything, the peak of live bytes during the pass (activations kept + the
largest transient, e.g. an MLP's hidden layer or a soft split's unfold; PyTorch's fused attention never
builds the N x N matrix, and neither does its meta kernel) and the bytes still held afterwards (what is
kept). Weights are counted from the parameters and buffers of a model built on the meta device.

``benchmarks/memory_estimate.py`` holds these estimates against the peak RSS measured on real runs.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .allocator import display_buffers
from .cachefiles import cache_dir, read_bytes, write_bytes

__all__ = ['MemoryEstimate', 'InsufficientMemory', 'LiveBytes', 'ReplayedByShape', 'EstimateStore', 'tensor_bytes',
           'module_bytes', 'measure_run', 'available_bytes', 'cgroup_available', 'check_fits', 'format_bytes',
           'code_version', 'INPUT_COPIES']

_logger = logging.getLogger(__name__)

INPUT_COPIES = 3  # the decoded image, the resized/normalized tensor and its stacked batch exist at once


class InsufficientMemory(ValueError):
    """A model or a run would not fit in the memory available; the message says how much is needed."""


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created by operations run under it, freeing them as they die.

    Tensors sharing a storage (views, in-place results) count once, while any of them is alive; views of
    memory allocated before (parameters, the caller's input) count nothing.

    ``replay``: on the meta device an operation's outputs depend only on its inputs' shapes, strides and
    dtypes and its other arguments, yet many kernels there are slow Python references (2 ms for a layer
    norm). An operation seen again with the same arguments gets new outputs of the recorded layout
    instead of running again (24 blocks of a ViT repeat one block's operations); operations whose outputs
    are views or in-place writes always run.
    """

    def __init__(self, replay: bool = True) -> None:
        super().__init__()
        self._storages: Dict[int, list] = {}  # storage id -> [tensors alive, bytes]
        self._layouts: Optional[Dict[tuple, tuple]] = {} if replay else None  # arguments -> outputs' layout
        self.live = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self._storages.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._storages[key]

    def _track(self, tensor: torch.Tensor, aliases_input: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            if aliases_input:
                return  # a view of, or an in-place write into, memory this tracker did not see allocated
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = _layout_key(func, args, kwargs) if self._layouts is not None else None
        layout = self._layouts.get(key) if key is not None else None
        if layout is not None:
            spec, outputs = layout
            out = tree_unflatten([torch.empty_strided(shape, stride, dtype=dtype, device='meta')
                                  for shape, stride, dtype in outputs], spec)
        else:
            out = func(*args, **kwargs)
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        leaves, spec = tree_flatten(out)
        for tensor in leaves:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, tensor.untyped_storage()._cdata in inputs)
        if key is not None and layout is None and _replayable(leaves, inputs):
            self._layouts[key] = (spec, [(t.shape, t.stride(), t.dtype) for t in leaves])
        return out


class _NoKey(Exception):
    pass


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            raise _NoKey
        return 'tensor', tuple(value.shape), value.stride(), value.storage_offset(), value.dtype
    if isinstance(value, (list, tuple)):
        return type(value).__name__, tuple(_describe(v) for v in value)
    if isinstance(value, dict):
        return 'dict', tuple((k, _describe(v)) for k, v in value.items())
    hash(value)  # TypeError for what cannot be a key
    return type(value), value  # 1 and 1.0 (and True) promote differently


def _layout_key(func, args: tuple, kwargs: dict) -> Optional[tuple]:
    """What a meta operation's outputs depend on, or None when it is not all meta tensors and plain values."""
    try:
        return func, torch.get_default_dtype(), _describe(args), _describe(kwargs)
    except (_NoKey, TypeError):
        return None


def _replayable(leaves: list, inputs: set) -> bool:
    """Outputs that are new, distinct meta tensors, each the only user of a storage of its exact size."""
    storages = set()
    for tensor in leaves:
        if not (isinstance(tensor, torch.Tensor) and tensor.is_meta) or tensor.storage_offset():
            return False
        storage = tensor.untyped_storage()
        if storage._cdata in inputs or storage._cdata in storages or \
                storage.nbytes() != _strided_bytes(tensor.shape, tensor.stride(), tensor.element_size()):
            return False
        storages.add(storage._cdata)
    return True


def _strided_bytes(shape: torch.Size, stride: Tuple[int, ...], itemsize: int) -> int:
    """Bytes of the storage ``torch.empty_strided`` allocates for this layout."""
    if any(n == 0 for n in shape):
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(shape, stride))) * itemsize


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one run needs on top of the process: the model's weights, and the pass itself."""
    weights: int  # parameters and buffers
    peak: int  # live at the peak of the pass: kept maps so far + the largest transient + the input
    kept: int  # still held when the pass returns (its results)

    @property
    def total(self) -> int:
        return self.weights + self.peak


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def module_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (also for a module on the meta device)."""
    return sum(tensor_bytes(t) for t in model.parameters()) + sum(tensor_bytes(t) for t in model.buffers())


def measure_run(run: Callable[[torch.Tensor], Any], input_shape: Tuple[int, ...]) -> Tuple[int, int]:
    """(peak, kept) bytes of ``run(x)`` executed shape-only on a meta input of ``input_shape``.

    ``run`` must use a model on the meta device. The input counts ``INPUT_COPIES`` times.
    """
    x = torch.empty(input_shape, device='meta')
    tracker = LiveBytes()
    with tracker:
        result = run(x)
        kept = tracker.live
    del result
    input_bytes = INPUT_COPIES * tensor_bytes(x)
    return tracker.peak + input_bytes, kept


class ReplayedByShape:
    """Wraps a per-map function (e.g. statistics) for shape-only runs: its allocations are measured once
    per input shape, and replayed as same-sized blocks for every other map of that shape.

    The result of a replayed call is a placeholder; only its bytes matter to an estimate.
    """

    def __init__(self, function: Callable[[torch.Tensor], Any]):
        self.function = function
        self._measured: Dict[tuple, Tuple[int, int]] = {}  # (shape, stride, dtype, prefix) -> (peak, kept)

    def __call__(self, fmap: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> Any:
        key = (tuple(fmap.shape), fmap.stride(), fmap.dtype, None if prefix is None else tuple(prefix.shape))
        measured = self._measured.get(key)
        if measured is None:
            tracker = LiveBytes()  # nested: the enclosing tracker sees these allocations too
            with tracker:
                result = self.function(fmap, prefix)
                kept = tracker.live
            self._measured[key] = (tracker.peak, kept)
            return result
        peak, kept = measured
        result = torch.empty(kept, dtype=torch.uint8, device=fmap.device)
        transient = torch.empty(peak - kept, dtype=torch.uint8, device=fmap.device)
        del transient
        return result


class EstimateStore:
    """Estimates kept on disk between processes (a server's cold start need not trace its models again).

    Entries are keyed by the code that made them: a hash of t2t-viz's sources and the torch and timm
    versions, so an estimate never outlives the code it describes. The file holds a few bytes per entry.
    """

    def __init__(self, path: Optional[Path] = None):
        self.path = path or cache_dir() / 'memory_estimates.json'
        self._lock = threading.Lock()
        self._entries: Optional[Dict[str, list]] = None
        self.code = code_version()

    def _load(self) -> Dict[str, list]:
        if self._entries is None:
            data = read_bytes(self.path)  # None unless this user alone can write the folder and the file
            try:
                entries = json.loads(data) if data is not None else {}
            except ValueError:
                entries = {}
            self._entries = entries if isinstance(entries, dict) else {}
        return self._entries

    def get(self, key: str) -> Optional[MemoryEstimate]:
        with self._lock:
            found = self._load().get(f'{self.code}|{key}')
        return MemoryEstimate(*found) if found else None

    def put(self, key: str, estimate: MemoryEstimate) -> None:
        with self._lock:
            entries = self._load()
            entries[f'{self.code}|{key}'] = [estimate.weights, estimate.peak, estimate.kept]
            current = {k: v for k, v in entries.items() if k.startswith(self.code + '|')}  # drop old code's
            if write_bytes(self.path, json.dumps(current).encode()):
                self._entries = current  # else (a read-only home) estimates are computed once per process


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """What files kept between runs are keyed by: the torch and timm versions and t2t-viz's sources, each
    by its size and modification time, as Python's bytecode cache knows its sources."""
    digest = hashlib.sha1(f'{torch.__version__}|{timm.__version__}'.encode())
    package = os.path.dirname(os.path.abspath(__file__))
    for folder, _, names in sorted(os.walk(package)):  # a third of pathlib's time, in a process's first load
        for name in sorted(n for n in names if n.endswith('.py')):
            status = os.stat(os.path.join(folder, name))
            digest.update(f'{os.path.relpath(folder, package)}/{name}|{status.st_size}|{status.st_mtime_ns}'.encode())
    return digest.hexdigest()[:16]


_CGROUP_ROOT = Path('/sys/fs/cgroup')
_PROC_CGROUP = Path('/proc/self/cgroup')
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def _read_number(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == 'max':
        return None
    try:
        number = int(text)
    except ValueError:
        return None
    return None if number >= _UNLIMITED else number


def _reclaimable(stat_file: Path, field: str) -> int:
    """Page cache the kernel drops before it kills (``inactive_file`` of memory.stat), as Docker counts it."""
    try:
        for line in stat_file.read_text().splitlines():
            key, _, value = line.partition(' ')
            if key == field:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_available(proc_cgroup: Path = _PROC_CGROUP, root: Path = _CGROUP_ROOT) -> Optional[int]:
    """Bytes this process's memory cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) still allows, the
    tightest over the cgroup and its ancestors; None when no limit applies (or cgroups are not mounted).

    A container's limit is where the kernel kills a process that goes over, whatever the host has free.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    tightest: Optional[int] = None
    for line in lines:
        _, controllers, path = line.split(':', 2)
        if controllers == '':  # v2: limit, usage and cache at every level of the unified hierarchy
            base, files = root, ('memory.max', 'memory.current', 'memory.stat', 'inactive_file')
        elif 'memory' in controllers.split(','):  # v1
            base, files = root / 'memory', ('memory.limit_in_bytes', 'memory.usage_in_bytes', 'memory.stat',
                                            'total_inactive_file')
        else:
            continue
        folder = base / path.lstrip('/')
        while True:
            limit = _read_number(folder / files[0])
            if limit is not None:
                used = (_read_number(folder / files[1]) or 0) - _reclaimable(folder / files[2], files[3])
                left = max(0, limit - max(0, used))
                tightest = left if tightest is None else min(tightest, left)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return tightest


def _host_available() -> int:
    try:
        with open('/proc/meminfo') as f:
            for line in f:
                if line.startswith('MemAvailable:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError, AttributeError):
        _logger.warning('cannot tell how much memory is available; assuming 8 GiB')
        return 8 * 2**30


def available_bytes(device: Optional[Union[str, torch.device]] = None) -> int:
    """Memory this process can be given now: on a CUDA device its free GPU memory (``mem_get_info``); else
    the system's (Linux MemAvailable, else free physical pages), never more than the memory cgroup allows."""
    device = torch.device(device) if device is not None else torch.device('cpu')
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    host = _host_available()
    limit = cgroup_available()
    return host if limit is None else min(host, limit)


def format_bytes(count: float) -> str:
    for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if abs(count) >= size:
            return f'{count / size:.1f} {unit}'
    return f'{int(count)} B'


def check_fits(needed: int, what: str, available: Optional[int] = None,
               device: Optional[Union[str, torch.device]] = None) -> None:
    """Raise InsufficientMemory naming ``what``, the bytes needed and the bytes available (on ``device``).

    When the host's memory is measured here and falls short, the idle buffers kept for display copies are
    given back to the system first and the memory is measured again."""
    on_gpu = device is not None and torch.device(device).type == 'cuda'
    measured = available is None
    available = available_bytes(device) if measured else available
    if needed > available and measured and not on_gpu and display_buffers.release():
        available = available_bytes(device)
    if needed > available:
        where = 'GPU memory' if on_gpu else 'memory'
        raise InsufficientMemory(f'{what} needs about {format_bytes(needed)}, but only {format_bytes(available)} '
                                 f'of {where} is available')
