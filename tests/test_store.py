"""The byte-budgeted store shared by every session."""
import threading
import time

import numpy as np
import pytest
import torch

from t2t_viz.store import ByteBudgetStore, default_budget, nbytes


def _mb(count: float) -> torch.Tensor:
    return torch.zeros(int(count * 2**20) // 4)  # float32


def test_nbytes_counts_each_storage_once():
    a = _mb(1)
    assert nbytes(a) == 2**20
    assert nbytes([a, a[:10], a.view(2, -1)]) == 2**20  # views share the storage
    assert nbytes({'x': a, 'y': [np.zeros(256, dtype=np.uint8)]}) == 2**20 + 256
    assert nbytes(torch.nn.Linear(10, 10)) == (100 + 10) * 4
    assert nbytes(torch.empty(100, device='meta')) == 0


def test_least_recently_used_are_evicted_by_bytes():
    store = ByteBudgetStore(budget=3 * 2**20)
    for key in 'abc':
        assert store.put(key, _mb(1))
    assert store.get('a') is not None  # a is now the most recently used
    store.put('d', _mb(1.5))  # needs 1.5 MB: b and c go, a stays
    assert store.get('b') is None and store.get('c') is None
    assert store.get('a') is not None and store.get('d') is not None
    stats = store.stats()
    assert stats.used == int(2.5 * 2**20) and stats.entries == 2 and stats.evictions == 2


def test_value_larger_than_the_budget_is_returned_but_not_kept():
    store = ByteBudgetStore(budget=2**20)
    store.put('small', _mb(0.5))
    value = store.get_or_create('huge', lambda: _mb(4))
    assert value.numel() * 4 == 4 * 2**20
    assert store.get('huge') is None and store.get('small') is not None  # nothing evicted for it
    assert store.stats().not_kept == 1


def test_concurrent_requests_for_one_key_create_it_once():
    store = ByteBudgetStore(budget=2**30)
    calls, results = [], []

    def create():
        calls.append(1)
        time.sleep(0.2)
        return _mb(1)

    threads = [threading.Thread(target=lambda: results.append(store.get_or_create('k', create))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 6 and all(r is results[0] for r in results)
    assert store.stats().hits == 5 and store.stats().misses == 1


def test_a_failed_creation_lets_the_next_caller_try_again():
    store = ByteBudgetStore(budget=2**30)
    with pytest.raises(RuntimeError, match='boom'):
        store.get_or_create('k', lambda: (_ for _ in ()).throw(RuntimeError('boom')))
    assert store.get_or_create('k', lambda: 42, size=lambda v: 8) == 42


def test_default_budget_from_environment(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_CACHE_BYTES', '1.5G')
    assert default_budget() == int(1.5 * 2**30)
    monkeypatch.setenv('T2T_VIZ_CACHE_BYTES', '300MiB')
    assert default_budget() == 300 * 2**20
    monkeypatch.setenv('T2T_VIZ_CACHE_BYTES', 'lots')
    with pytest.raises(ValueError, match='T2T_VIZ_CACHE_BYTES'):
        default_budget()
    monkeypatch.delenv('T2T_VIZ_CACHE_BYTES')
    monkeypatch.setenv('T2T_VIZ_CACHE_FRACTION', '0.1')
    from t2t_viz import memory
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: 10 * 2**30)
    assert default_budget() == 2**30


def test_bytes_held_outside_the_store_count_against_its_budget_while_their_owner_lives():
    import gc
    from PIL import Image
    from t2t_viz.images import decoded_bytes
    store = ByteBudgetStore(budget=1000)
    store.put('a', np.zeros(400, dtype=np.uint8))
    store.put('b', np.zeros(400, dtype=np.uint8))
    image = Image.new('RGB', (10, 10))  # 400 bytes: Pillow keeps RGB pixels in 32 bits
    store.hold(image, decoded_bytes(image))
    assert store.stats().held == 400 and store.get('a') is None and store.get('b') is not None  # 'a' made room
    assert not store.put('c', np.zeros(700, dtype=np.uint8))  # more than the budget leaves beside the image
    del image
    gc.collect()
    assert store.stats().held == 0
    assert store.put('c', np.zeros(600, dtype=np.uint8))
