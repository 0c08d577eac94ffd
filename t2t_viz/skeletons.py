"""Model skeletons kept on disk between processes.

A skeleton is a model built on the meta device: every module, shape and setting, and no data. Once no
initialisation runs, building the modules is most of what loading a small file costs (ResNet50: 30 ms
of Python, while reading its 100 MB file takes 25-40 ms); unpickling the same skeleton takes 3-5 ms. So
the first build of a model is pickled into the cache folder, and later builds, in any process, unpickle it.

A pickle is code, as Python's bytecode cache is. So a skeleton is read and written only as
:mod:`t2t_viz.cachefiles` allows (a folder and a file that this user owns and nobody else can write, no
symbolic links followed), and it is keyed by everything that shaped it: t2t-viz's
sources, the torch and timm versions, timm's layer settings, the model's name and input size. It never
outlives the code that built it. The folder is kept under ``MAX_BYTES``, least recently used first out.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Optional

import timm.layers
import torch.nn as nn

from .cachefiles import cache_dir, read_bytes, write_bytes
from .memory import code_version

__all__ = ['MAX_BYTES', 'load_or_build', 'folder']

_logger = logging.getLogger(__name__)

MAX_BYTES = 32 * 2**20  # a skeleton takes 20-100 kB


def folder() -> Path:
    return cache_dir() / 'skeletons'


def _file_name(key: str) -> str:
    settings = (timm.layers.use_fused_attn(), timm.layers.is_exportable(), timm.layers.is_scriptable(),
                timm.layers.is_no_jit())  # read by timm's layers while they are built
    return hashlib.sha1(f'{code_version()}|{settings}|{key}'.encode()).hexdigest() + '.pkl'


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _read(path: Path) -> Optional[nn.Module]:
    data = read_bytes(path)  # None unless this user alone can write the folder and the file
    if data is None:
        return None
    try:
        model = pickle.loads(data)
        os.utime(path)  # recently used: pruned last
    except Exception as e:  # noqa: BLE001 - a damaged file or a class that moved raises many kinds
        _logger.info('%s: unreadable skeleton, building again (%s)', path, e)
        return None
    return model if isinstance(model, nn.Module) else None


def _prune(directory: Path) -> None:
    entries = []
    for path in directory.glob('*.pkl'):
        try:
            status = path.stat()
        except FileNotFoundError:  # pruned by another process
            continue
        entries.append((status.st_mtime, status.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= MAX_BYTES:
            break
        path.unlink(missing_ok=True)
        total -= size


def _write(path: Path, model: nn.Module) -> None:
    try:
        data = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - e.g. a hook that is a local function cannot be pickled
        _logger.info('%s: skeleton not kept (%s)', type(model).__name__, e)
        return
    if write_bytes(path, data):
        _prune(path.parent)


def load_or_build(key: str, build: Callable[[], nn.Module]) -> nn.Module:
    """The model ``build()`` makes on the meta device; unpickled when any process has built it before.

    ``key`` names everything ``build`` depends on besides the code (the model's name and input size).
    """
    path = folder() / _file_name(key)
    model = _read(path)
    if model is None:
        model = build()
        if _all_meta(model):
            _write(path, model)
    return model
