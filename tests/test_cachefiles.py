"""One rule for every file kept in the cache folder: skeletons and memory estimates alike."""
import json
import os

import pytest

from t2t_viz import cachefiles, skeletons, zoo
from t2t_viz.memory import EstimateStore, MemoryEstimate

as_root = pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() != 0, reason='chown needs root')


@pytest.fixture
def folder(empty_cache_dir):
    empty_cache_dir.mkdir(mode=0o700)
    return empty_cache_dir


def test_written_whole_for_this_user_alone_and_read_back(folder):
    path = folder / 'sub' / 'file.json'
    assert cachefiles.write_bytes(path, b'{"a": 1}')
    assert cachefiles.read_bytes(path) == b'{"a": 1}'
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ['file.json']  # no partial file left


def test_a_folder_others_can_write_is_neither_read_nor_written(folder):
    estimates = EstimateStore(folder / 'memory_estimates.json')
    estimates.put('resnet18|224', MemoryEstimate(1, 2, 3))
    folder.chmod(0o777)
    try:
        assert cachefiles.read_bytes(folder / 'memory_estimates.json') is None
        assert EstimateStore(folder / 'memory_estimates.json').get('resnet18|224') is None
        assert not cachefiles.write_bytes(folder / 'other.json', b'{}')
        skeletons.load_or_build('linear', lambda: __import__('torch').nn.Linear(2, 2, device='meta'))
    finally:
        folder.chmod(0o700)
    assert sorted(p.name for p in folder.iterdir()) == ['memory_estimates.json']


def test_a_planted_estimate_cannot_lift_the_memory_refusal(folder, monkeypatch):
    """An entry saying a model needs 1 byte is believed only from a file that this user alone can write."""
    store = EstimateStore(folder / 'memory_estimates.json')
    key = 'vit_large_patch16_224|2048'
    planted = folder / 'memory_estimates.json'
    planted.write_text(json.dumps({f'{store.code}|{key}': [1, 1, 1]}))
    planted.chmod(0o666)
    assert EstimateStore(planted).get(key) is None
    planted.chmod(0o600)
    assert EstimateStore(planted).get(key) == MemoryEstimate(1, 1, 1)


@as_root
def test_a_file_of_another_user_is_not_read(folder):
    path = folder / 'memory_estimates.json'
    path.write_text('{}')
    path.chmod(0o600)
    os.chown(path, 12345, 12345)
    assert cachefiles.read_bytes(path) is None
    os.chown(folder, 12345, 12345)
    try:
        assert not cachefiles.write_bytes(folder / 'x', b'')
    finally:
        os.chown(folder, os.getuid(), os.getgid())


def test_symbolic_links_are_never_followed(folder, tmp_path, monkeypatch):
    victim = tmp_path / 'victim'
    victim.write_bytes(b'precious')
    victim.chmod(0o600)
    link = folder / 'memory_estimates.json'
    link.symlink_to(victim)
    assert cachefiles.read_bytes(link) is None  # a link is not read, even to this user's own file
    monkeypatch.setattr(cachefiles.secrets, 'token_hex', lambda n: 'fixed')
    partial = folder / '.skeleton.pkl.fixed.part'
    partial.symlink_to(victim)
    assert not cachefiles.write_bytes(folder / 'skeleton.pkl', b'evil')  # the partial name is taken: not followed
    assert victim.read_bytes() == b'precious' and partial.is_symlink()
    partial.unlink()
    assert cachefiles.write_bytes(link, b'{}')  # the link itself is replaced by a file, its target untouched
    assert not link.is_symlink() and victim.read_bytes() == b'precious'


def test_the_cache_folder_itself_is_made_for_this_user_alone(empty_cache_dir):
    zoo.build_on_meta('resnet18')
    assert empty_cache_dir.stat().st_mode & 0o777 == 0o700
    assert (empty_cache_dir / 'skeletons').stat().st_mode & 0o777 == 0o700
    memory_file = empty_cache_dir / 'memory_estimates.json'
    EstimateStore(memory_file).put('k', MemoryEstimate(1, 2, 3))
    assert memory_file.stat().st_mode & 0o777 == 0o600
