"""Safe reading of checkpoint files.

Release files are pickles written by ``torch.save``. They are read with ``weights_only=True`` so that a
file can never run code; only the few harmless globals that training scripts put next to the weights
(an argparse ``Namespace`` under ``args``, NumPy scalars for metrics) are allow-listed.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from typing import Any, Dict

import numpy as np
import torch

__all__ = ['CheckpointError', 'read_checkpoint', 'SAFE_GLOBALS']


class CheckpointError(ValueError):
    """A checkpoint file could not be read or does not fit the model; the message names the file."""


def _numpy_safe_globals() -> list:
    multiarray = getattr(np, '_core', None) or np.core
    safe = [multiarray.multiarray.scalar, np.dtype]
    safe += [getattr(np.dtypes, name) for name in ('Float64DType', 'Float32DType', 'Int64DType')]
    return safe


SAFE_GLOBALS = [argparse.Namespace, *_numpy_safe_globals()]


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Dict[str, Any]:
    """Read a ``.pth``/``.pth.tar``/``.bin`` pickle or a ``.safetensors`` file without executing code.

    Returns the top-level object (a state dict or a training checkpoint dict). Raises CheckpointError
    with the file name and the reason for a missing, corrupt or unsafe file. ``mmap``: the tensors of a
    zip-format pickle are mapped from the file (copy-on-write), not read into memory; their pages are read
    when first used and can be dropped again under memory pressure. Files in the legacy (pre-1.6) format,
    which cannot be mapped, are read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such checkpoint file')
    if path.endswith('.safetensors'):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device='cpu')
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True,
                                    mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e)
        if 'Weights only load failed' in reason or 'Unsupported global' in reason:
            refused = re.search(r'GLOBAL ([\w.]+)', reason)
            what = f'the global {refused.group(1)}' if refused else 'a pickled object that is not plain tensor data'
            raise CheckpointError(
                f'{path}: refused to load: the file contains {what}; only weights, plain containers and '
                'argparse.Namespace are accepted (arbitrary pickles can execute code)') from e
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({reason.splitlines()[0]})') from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f'{path}: corrupt or truncated checkpoint ({first_line})') from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path}: expected a dict of tensors, found {type(checkpoint).__name__}')
    return checkpoint
