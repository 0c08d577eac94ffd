"""Download trained weights with per-file progress, shared between callers.

timm's own download shows a console progress bar at best; the CLI and the Streamlit app need the bytes done
and the total of every file, and several browser sessions asking for the same weights should share one
transfer. This module streams a :class:`RemoteFile` over HTTP(S) with ``urllib`` into a directory the caller
chooses (the zoo passes ``checkpoints/``) under a file name its weight lookup already accepts:
``82.3_T2T_ViT_24.pth.tar`` for release files, ``<model>.<tag>.safetensors`` for Hugging Face files.

A file is written as ``<name>.part`` and renamed to ``<name>`` only once it is complete (and its SHA-256
matches when a prefix is known), so a file under the final name is always whole. A failed download
removes its ``.part`` file; one killed with the process leaves it behind, and the next attempt overwrites it.

* :func:`remote_file` turns a timm ``PretrainedCfg`` into a :class:`RemoteFile`;
* :func:`offline_reason` is a quick TCP probe that says, in words, why a URL cannot be reached;
* :func:`download` fetches one file in the calling thread;
* :func:`manager` returns the process-wide :class:`DownloadManager`, which runs downloads in background
  threads and reports a :class:`DownloadStatus` snapshot to anyone who asks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlparse

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent processes are not guarded against
    fcntl = None

__all__ = [
    'RemoteFile', 'DownloadError', 'DownloadStatus', 'DownloadManager', 'ProgressCallback',
    'remote_file', 'offline_reason', 'download', 'manager', 'DEFAULT_HF_ENDPOINT', 'OFFLINE_VARIABLES',
    'PART_SUFFIX',
]

_logger = logging.getLogger(__name__)

DEFAULT_HF_ENDPOINT = 'https://huggingface.co'
OFFLINE_VARIABLES = ('T2T_VIZ_OFFLINE', 'HF_HUB_OFFLINE')
PART_SUFFIX = '.part'

ProgressCallback = Callable[[int, Optional[int]], None]  # (done_bytes, total_bytes or None)

_TRUE_VALUES = ('1', 'true', 'yes', 'on')
_DEFAULT_PORTS = {'http': 80, 'https': 443}
# torch.hub's convention: `name-<first hex digits of the SHA-256>.ext`, e.g. resnet50-0676ba61.pth
_HASH_IN_NAME = re.compile(r'.+-([0-9a-f]{6,64})(?:\.[A-Za-z0-9]+)+')
_USER_AGENT = 't2t-viz (urllib)'


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """A file to fetch: where it is, the local file name to give it, and the start of its SHA-256 if known."""
    url: str
    filename: str
    sha256_prefix: Optional[str] = None


class DownloadError(RuntimeError):
    """A download failed; the one-line message names the URL and the reason."""

    def __init__(self, url: str, reason: str):
        super().__init__(f'cannot download {url}: {reason}')
        self.url = url
        self.reason = reason

    def __reduce__(self):
        return type(self), (self.url, self.reason)


def _hub_extension(hub_filename: str) -> str:
    return '.pth.tar' if hub_filename.endswith('.pth.tar') else PurePosixPath(hub_filename).suffix or '.safetensors'


def remote_file(pretrained_cfg, name: str) -> Optional[RemoteFile]:
    """Where the weights described by a timm ``PretrainedCfg`` are, or None when it names no remote file.

    ``name`` is the timm name with its tag (``resnet50.tv_in1k``). Like timm, the Hugging Face hub is
    preferred when the config names a hub repository (``HF_ENDPOINT`` is honoured); the file is then saved
    as ``<name>.safetensors`` (or the hub file's extension). Otherwise the release URL is used as is and
    the file keeps its own name, with torch.hub's ``name-<hex>.ext`` hash prefix checked when present.
    """
    if pretrained_cfg.hf_hub_id:
        repo_id, _, revision = pretrained_cfg.hf_hub_id.partition('@')  # timm's `org/name@revision`
        hub_filename = pretrained_cfg.hf_hub_filename or 'model.safetensors'
        endpoint = (os.environ.get('HF_ENDPOINT') or DEFAULT_HF_ENDPOINT).rstrip('/')
        return RemoteFile(
            url=f'{endpoint}/{repo_id}/resolve/{revision or "main"}/{hub_filename}',
            filename=f'{name}{_hub_extension(hub_filename)}',
        )
    if pretrained_cfg.url:
        basename = PurePosixPath(urlparse(pretrained_cfg.url).path).name
        hash_match = _HASH_IN_NAME.fullmatch(basename)
        return RemoteFile(pretrained_cfg.url, basename, hash_match.group(1) if hash_match else None)
    return None


def _probe_address(url: str) -> Tuple[str, int]:
    """The host and port a request for ``url`` connects to first: its own, or its scheme's proxy."""
    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and parsed.hostname and not urllib.request.proxy_bypass(parsed.hostname):
        parsed = urlparse(proxy if '://' in proxy else f'http://{proxy}')
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.hostname:
        raise ValueError(f'not an http(s) URL: {url}')
    return parsed.hostname, parsed.port or _DEFAULT_PORTS[parsed.scheme]


def _connect(host: str, port: int, timeout: float) -> Optional[str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as e:
        return f'cannot resolve {host} ({e.strerror or e})'
    except TimeoutError:
        return f'cannot reach {host}:{port} (no answer within {timeout:g} s)'
    except OSError as e:
        return f'cannot reach {host}:{port} ({e.strerror or e})'


def offline_reason(url: str, timeout: float = 3.0) -> Optional[str]:
    """None when ``url``'s host accepts a TCP connection within ``timeout`` seconds, else why not, in words.

    Name resolution counts against the timeout too, so an offline machine is told within ``timeout``.
    """
    for variable in OFFLINE_VARIABLES:
        value = os.environ.get(variable, '')
        if value.strip().lower() in _TRUE_VALUES:
            return f'offline mode: {variable}={value} is set'
    try:
        host, port = _probe_address(url)
    except ValueError as e:  # also a port that is not a number
        return str(e)
    outcome: List[Optional[str]] = []
    probe = threading.Thread(
        target=lambda: outcome.append(_connect(host, port, timeout)), name=f'probe {host}:{port}', daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f'cannot reach {host}:{port} (no answer within {timeout:g} s)'
    return outcome[0]


class _PartFileBusy(Exception):
    """Another process (or thread) holds the lock on the ``.part`` file."""


def _open_part_file(part: Path):
    """Open ``part`` empty for writing, holding an exclusive lock so that nobody else writes it meanwhile."""
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _PartFileBusy from None
            try:
                still_there = os.path.samestat(os.fstat(fd), os.stat(part))
            except FileNotFoundError:
                still_there = False
            if not still_there:  # its owner renamed it to the final name (or removed it) meanwhile
                raise _PartFileBusy
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, 'wb')


def _reason(error: BaseException) -> str:
    """A short account of a network error."""
    if isinstance(error, urllib.error.HTTPError):
        return f'HTTP {error.code} {error.reason}'
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return str(error.reason)
        error = error.reason
    if isinstance(error, socket.gaierror):
        return f'cannot resolve the host ({error.strerror or error})'
    if isinstance(error, TimeoutError):
        return 'timed out waiting for the server'
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f'{type(error).__name__}: {error}' if str(error) else type(error).__name__


def _transfer(remote: RemoteFile, out, part: Path, progress: Optional[ProgressCallback], chunk_bytes: int,
              timeout: float) -> Tuple[int, Optional[int], str]:
    """Stream ``remote.url`` into ``out``; returns bytes received, Content-Length (or None) and the SHA-256."""
    request = urllib.request.Request(remote.url, headers={'User-Agent': _USER_AGENT})
    digest = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get('Content-Length', '')
            total = int(length) if length.isdigit() else None
            if progress:
                progress(done, total)
            while chunk := response.read1(chunk_bytes):  # what has arrived, so progress follows the wire
                try:
                    out.write(chunk)
                except OSError as e:
                    raise DownloadError(remote.url, f'cannot write {part} ({e.strerror or e})') from e
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except DownloadError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise DownloadError(remote.url, _reason(e)) from e
    return done, total, digest.hexdigest()


def download(
        remote: RemoteFile,
        directory: Path,
        progress: Optional[ProgressCallback] = None,
        chunk_bytes: int = 1 << 20,
        timeout: float = 30,
) -> Path:
    """Fetch ``remote`` into ``directory/remote.filename`` and return that path.

    Returns at once when the file is already there. ``progress(done_bytes, total_bytes)`` is called before
    the first byte and after every read of at most ``chunk_bytes`` (total from Content-Length, None when the
    server sends none). ``timeout`` bounds the connection and every wait for data. On any failure raises
    :class:`DownloadError` and leaves neither the ``.part`` file nor anything under the final name.
    """
    directory = Path(directory)
    final = directory / remote.filename
    if final.is_file():
        return final
    part = final.with_name(final.name + PART_SUFFIX)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        out = _open_part_file(part)
    except _PartFileBusy:
        if final.is_file():  # the other download just finished
            return final
        raise DownloadError(remote.url, f'another download is writing {part}') from None
    except OSError as e:
        raise DownloadError(remote.url, f'cannot write {part} ({e.strerror or e})') from e
    with out:  # the lock is held until the file has its final name or is gone
        try:
            done, total, sha256 = _transfer(remote, out, part, progress, chunk_bytes, timeout)
            if total is not None and done != total:
                raise DownloadError(remote.url, f'connection closed after {done} of {total} bytes')
            if remote.sha256_prefix and not sha256.startswith(remote.sha256_prefix.lower()):
                raise DownloadError(remote.url, f'SHA-256 mismatch: the file\'s hash is {sha256}, '
                                                f'expected one starting with {remote.sha256_prefix}')
            try:
                out.flush()
                os.fsync(out.fileno())
                os.replace(part, final)
            except OSError as e:
                raise DownloadError(remote.url, f'cannot write {final} ({e.strerror or e})') from e
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    _logger.info('downloaded %s to %s (%d bytes)', remote.url, final, done)
    return final


@dataclasses.dataclass(frozen=True)
class DownloadStatus:
    """A snapshot of one managed download."""
    state: str  # 'running' | 'done' | 'failed'
    path: Path  # the final file (present only when state is 'done')
    url: str
    done_bytes: int = 0
    total_bytes: Optional[int] = None
    error: str = ''  # the DownloadError message when state is 'failed'

    @property
    def fraction(self) -> Optional[float]:
        """Share of the file received, 0..1, or None while the total size is unknown."""
        if self.state == 'done':
            return 1.0
        if not self.total_bytes:
            return None
        return min(1.0, self.done_bytes / self.total_bytes)


class DownloadManager:
    """Runs downloads in background threads, one per destination file, and reports their progress.

    Thread-safe; meant to be shared by every caller in the process (see :func:`manager`). A second
    :meth:`start` for a destination that is downloading or done returns the existing status instead of
    fetching again; a failed download is retried by calling :meth:`start` again. Downloads run in daemon
    threads that no caller owns, so a caller going away (a closed browser tab) does not stop them.
    """

    def __init__(self):
        self._changed = threading.Condition()
        self._statuses: Dict[Path, DownloadStatus] = {}

    @staticmethod
    def _destination(remote: RemoteFile, directory: Path) -> Path:
        return (Path(directory) / remote.filename).resolve()

    def start(self, remote: RemoteFile, directory: Path) -> DownloadStatus:
        """Start downloading ``remote`` into ``directory`` unless it is already running or done."""
        path = self._destination(remote, directory)
        with self._changed:
            current = self._statuses.get(path)
            if current is not None and (current.state == 'running' or (current.state == 'done' and path.is_file())):
                return current
            if path.is_file():
                size = path.stat().st_size
                self._statuses[path] = DownloadStatus('done', path, remote.url, size, size)
            else:
                self._statuses[path] = DownloadStatus('running', path, remote.url)
                threading.Thread(
                    target=self._run, args=(remote, path), name=f'download {remote.filename}', daemon=True).start()
            self._changed.notify_all()
            return self._statuses[path]

    def status(self, remote: RemoteFile, directory: Path) -> Optional[DownloadStatus]:
        """The latest snapshot for ``remote`` in ``directory``, or None if it was never started."""
        with self._changed:
            return self._statuses.get(self._destination(remote, directory))

    def wait(self, remote: RemoteFile, directory: Path, timeout: Optional[float] = None) -> Optional[DownloadStatus]:
        """Block until the download is no longer running (or ``timeout`` passes); returns its latest status."""
        path = self._destination(remote, directory)
        with self._changed:
            self._changed.wait_for(
                lambda: path not in self._statuses or self._statuses[path].state != 'running', timeout)
            return self._statuses.get(path)

    def _update(self, path: Path, **changes) -> None:
        with self._changed:
            self._statuses[path] = dataclasses.replace(self._statuses[path], **changes)
            self._changed.notify_all()

    def _run(self, remote: RemoteFile, path: Path) -> None:
        def progress(done: int, total: Optional[int]) -> None:
            self._update(path, done_bytes=done, total_bytes=total)

        try:
            download(remote, path.parent, progress)
        except DownloadError as e:
            _logger.warning('%s', e)
            self._update(path, state='failed', error=str(e))
        except Exception as e:  # noqa: BLE001 - the thread must always leave a final state behind
            _logger.exception('download of %s failed unexpectedly', remote.url)
            self._update(path, state='failed', error=str(DownloadError(remote.url, _reason(e))))
        else:
            size = path.stat().st_size
            self._update(path, state='done', done_bytes=size, total_bytes=size)


_MANAGER = DownloadManager()


def manager() -> DownloadManager:
    """The process-wide :class:`DownloadManager` shared by the CLI and every app session."""
    return _MANAGER
