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
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

__all__ = ['MemoryEstimate', 'InsufficientMemory', 'LiveBytes', 'ReplayedByShape', 'EstimateStore', 'tensor_bytes',
           'module_bytes', 'measure_run', 'available_bytes', 'check_fits', 'format_bytes', 'cache_dir', 'code_version',
           'replace_file', 'INPUT_COPIES']

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
        self._measured: Dict[tuple, Tuple[int, int]] = {}  # (shape, stride, dtype) -> (peak, kept)

    def __call__(self, fmap: torch.Tensor) -> Any:
        key = (tuple(fmap.shape), fmap.stride(), fmap.dtype)
        measured = self._measured.get(key)
        if measured is None:
            tracker = LiveBytes()  # nested: the enclosing tracker sees these allocations too
            with tracker:
                result = self.function(fmap)
                kept = tracker.live
            self._measured[key] = (tracker.peak, kept)
            return result
        peak, kept = measured
        result = torch.empty(kept, dtype=torch.uint8, device=fmap.device)
        transient = torch.empty(peak - kept, dtype=torch.uint8, device=fmap.device)
        del transient
        return result


def cache_dir() -> Path:
    """Where t2t-viz keeps small files between runs: T2T_VIZ_CACHE_DIR, else ~/.cache/t2t_viz."""
    return Path(os.environ.get('T2T_VIZ_CACHE_DIR') or Path.home() / '.cache' / 't2t_viz').expanduser()


def replace_file(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` in one step: other processes read the old file or the new one, never a
    part. A new file gets ``mode`` (less the umask); the folder must exist."""
    partial = path.with_name(f'{path.name}.{os.getpid()}.{threading.get_ident()}.part')
    try:
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), 'wb') as f:
            f.write(data)
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


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
            try:
                entries = json.loads(self.path.read_text())
                self._entries = entries if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                self._entries = {}
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
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                replace_file(self.path, json.dumps(current).encode())
                self._entries = current
            except OSError as e:  # a read-only home: estimates are then computed once per process
                _logger.info('memory estimates not saved (%s)', e)


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


def available_bytes() -> int:
    """Memory the system can give this process now (Linux MemAvailable; else free physical pages)."""
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


def format_bytes(count: float) -> str:
    for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if abs(count) >= size:
            return f'{count / size:.1f} {unit}'
    return f'{int(count)} B'


def check_fits(needed: int, what: str, available: Optional[int] = None) -> None:
    """Raise InsufficientMemory naming ``what``, the bytes needed and the bytes available."""
    available = available_bytes() if available is None else available
    if needed > available:
        raise InsufficientMemory(f'{what} needs about {format_bytes(needed)}, but only {format_bytes(available)} '
                                 'of memory is available')
