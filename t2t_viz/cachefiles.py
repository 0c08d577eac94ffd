"""Files kept between runs in the cache folder (model skeletons, memory estimates): one rule for all of them.

What is read back is trusted: a skeleton is a pickle, which is code, and a memory estimate decides what the
server refuses. So every read and every write follows the same rule:

* the folder must belong to this user and be writable by nobody else; a folder that is not is neither read
  nor written (one warning says why) and the caller computes what it would have read;
* files are opened without following symbolic links (``O_NOFOLLOW``), and a file is read only when it
  belongs to this user and nobody else can write it;
* a file is written whole into a new partial file (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600, a random
  name) and renamed over the old one, so readers see the old file or the new one, never a part, and nothing
  planted at the partial name is followed or overwritten.

On systems without file owners (Windows) nothing is kept.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Optional, Set

__all__ = ['cache_dir', 'trusted_folder', 'read_bytes', 'write_bytes']

_logger = logging.getLogger(__name__)
_warned: Set[str] = set()
_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)


def cache_dir() -> Path:
    """Where t2t-viz keeps small files between runs: T2T_VIZ_CACHE_DIR, else ~/.cache/t2t_viz."""
    return Path(os.environ.get('T2T_VIZ_CACHE_DIR') or Path.home() / '.cache' / 't2t_viz').expanduser()


def _only_mine(status: os.stat_result) -> bool:
    return status.st_uid == os.getuid() and not status.st_mode & 0o022


def _warn_once(message: str, *args) -> None:
    text = message % args
    if text not in _warned:
        _warned.add(text)
        _logger.warning(text)


def trusted_folder(folder: Path, create: bool = False) -> bool:
    """Whether ``folder`` may be read from and written to (see module doc): it and every folder between it and
    the cache folder are this user's alone, so nobody else can swap any of them. Made (0700) when asked."""
    if not hasattr(os, 'getuid'):
        return False
    root = cache_dir()
    chain = [folder] + [parent for parent in folder.parents if parent == root or root in parent.parents]
    for part in reversed(chain):  # from the cache folder down
        if create and not os.path.lexists(part):
            try:
                part.mkdir(mode=0o700, parents=part == root)
            except FileExistsError:  # made by another process meanwhile: checked below
                pass
            except OSError as e:  # a read-only home: nothing is kept
                _logger.info('%s: not made (%s)', part, e)
                return False
        try:
            status = os.lstat(part)
        except OSError:
            return False
        if not _only_mine(status) or not stat.S_ISDIR(status.st_mode):
            _warn_once('%s: nothing is read from or written to this folder: it is a link, or another user owns '
                       'it or can write it', part)
            return False
    return True


def read_bytes(path: Path) -> Optional[bytes]:
    """The file's bytes, or None when it is missing, a link, or not this user's alone (or its folder is not)."""
    if not trusted_folder(path.parent):
        return None
    try:
        descriptor = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError:  # missing, or a symbolic link (ELOOP)
        return None
    with open(descriptor, 'rb') as f:
        if not _only_mine(os.fstat(f.fileno())):
            _warn_once('%s: not read: another user owns it or can write it', path)
            return None
        return f.read()


def write_bytes(path: Path, data: bytes) -> bool:
    """Replace ``path`` with ``data`` in one step (mode 0600), making its folder (0700) if needed; False when
    the folder is not trusted or the write fails."""
    if not trusted_folder(path.parent, create=True):
        return False
    partial = path.with_name(f'.{path.name}.{secrets.token_hex(8)}.part')
    try:
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    except OSError as e:  # something is already there: leave it alone
        _logger.info('%s: not written (%s)', path, e)
        return False
    try:
        with open(descriptor, 'wb') as f:
            f.write(data)
        os.replace(partial, path)
        return True
    except OSError as e:
        _logger.info('%s: not written (%s)', path, e)
        partial.unlink(missing_ok=True)
        return False
