"""One byte-budgeted store for everything kept between requests: models, captures, results.

Shared by every session of a server and thread-safe. Entries are measured in bytes (the tensors and
arrays they hold), the least recently used are evicted when the budget is exceeded, and a value larger
than the whole budget is handed to its caller without being kept. Two callers asking for the same key at
once compute it once: the second waits for the first.

The budget comes from ``T2T_VIZ_CACHE_BYTES`` (bytes, or with a K/M/G suffix) or
``T2T_VIZ_CACHE_FRACTION`` of the memory available when the store is created (default 0.25).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from . import memory
from .images import decoded_bytes

__all__ = ['ByteBudgetStore', 'StoreStats', 'nbytes', 'default_budget', 'DEFAULT_FRACTION']

_logger = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.25
_SUFFIXES = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def default_budget() -> int:
    """The configured budget in bytes (see module doc)."""
    configured = os.environ.get('T2T_VIZ_CACHE_BYTES', '').strip().upper().rstrip('IB')
    if configured:
        scale = _SUFFIXES.get(configured[-1], 1)
        number = configured[:-1] if configured[-1] in _SUFFIXES else configured
        try:
            return int(float(number) * scale)
        except ValueError:
            raise ValueError(f'T2T_VIZ_CACHE_BYTES must be a number of bytes such as 4G, not '
                             f"{os.environ['T2T_VIZ_CACHE_BYTES']!r}") from None
    fraction = float(os.environ.get('T2T_VIZ_CACHE_FRACTION', DEFAULT_FRACTION))
    return int(memory.available_bytes() * fraction)


def nbytes(value: Any) -> int:
    """Bytes of the tensors and arrays reachable from ``value`` (each storage counted once)."""
    seen: set = set()
    return _nbytes(value, seen)


def _nbytes(value: Any, seen: set) -> int:
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            return 0
        storage = value.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return storage.nbytes()
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        if id(base) in seen:
            return 0
        seen.add(id(base))
        return base.nbytes if isinstance(base, np.ndarray) else value.nbytes
    if isinstance(value, torch.nn.Module):
        return sum(_nbytes(t, seen) for t in list(value.parameters()) + list(value.buffers()))
    if isinstance(value, dict):
        return sum(_nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return sum(_nbytes(v, seen) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_nbytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, Image.Image):
        return decoded_bytes(value)
    return 0


@dataclass(frozen=True)
class StoreStats:
    budget: int
    used: int
    entries: int
    hits: int
    misses: int
    evictions: int
    not_kept: int  # values larger than the whole budget, handed out without being kept
    held: int = 0  # bytes kept outside the store by live owners (see ByteBudgetStore.hold)


class ByteBudgetStore:
    """A least-recently-used map bounded by the bytes of its values, and of what sessions hold beside it."""

    def __init__(self, budget: Optional[int] = None):
        self.budget = default_budget() if budget is None else int(budget)
        self._entries: "OrderedDict[Hashable, Tuple[Any, int]]" = OrderedDict()
        self._pending: Dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        self._used = 0
        self._held: Dict[int, int] = {}  # hold token -> bytes
        self._next_token = 0
        self._hits = self._misses = self._evictions = self._not_kept = 0

    def get(self, key: Hashable) -> Any:
        """The value under ``key`` (marked as just used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, value: Any, size: Optional[int] = None) -> bool:
        """Keep ``value``, evicting the least recently used; False when it is larger than the budget."""
        size = nbytes(value) if size is None else size
        with self._lock:
            self._remove(key)
            room = self.budget - sum(self._held.values())
            if size > room:
                self._not_kept += 1
                _logger.info('not kept: %s of %s is over the %s the budget leaves beside what sessions hold',
                             memory.format_bytes(size), key, memory.format_bytes(max(0, room)))
                return False
            self._evict(room - size)
            self._entries[key] = (value, size)
            self._used += size
            return True

    def get_or_create(self, key: Hashable, create: Callable[[], Any],
                      size: Optional[Callable[[Any], int]] = None) -> Any:
        """The value under ``key``, created (once, however many threads ask at the same time) when missing."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return entry[0]
                waiting = self._pending.get(key)
                if waiting is None:
                    self._pending[key] = threading.Event()
                    self._misses += 1
                    break
            waiting.wait()  # another thread is creating it; then look again (it may have failed or not fit)
            with self._lock:
                if key not in self._entries and key not in self._pending:
                    self._pending[key] = threading.Event()
                    self._misses += 1
                    break
        try:
            value = create()
            self.put(key, value, size(value) if size else None)
            return value
        finally:
            with self._lock:
                self._pending.pop(key).set()

    def hold(self, owner: object, size: int) -> None:
        """Count ``size`` bytes that ``owner`` keeps outside the store (a session's decoded image, a dataset job's
        files) against the budget for as long as ``owner`` lives, evicting least recently used entries to
        make room. Released when ``owner`` is garbage collected."""
        with self._lock:
            token = self._next_token
            self._next_token += 1
            self._held[token] = size
            self._evict(self.budget - sum(self._held.values()))
        weakref.finalize(owner, self._release, token)

    def _release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)

    def _evict(self, room: int) -> None:
        """Drop least recently used entries until they take at most ``room`` bytes."""
        while self._entries and self._used > room:
            self._remove(next(iter(self._entries)))
            self._evictions += 1

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._remove(key)

    def discard_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key matches (e.g. a model's results once its trained weights arrive)."""
        with self._lock:
            keys = [key for key in self._entries if predicate(key)]
            for key in keys:
                self._remove(key)
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._used = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(self.budget, self._used, len(self._entries), self._hits, self._misses,
                              self._evictions, self._not_kept, sum(self._held.values()))

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= entry[1]
