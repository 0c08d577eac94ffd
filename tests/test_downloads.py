"""The weights downloader against a local HTTP server: progress, hashes, failures, probes and sharing."""
from __future__ import annotations

import hashlib
import http.server
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import timm
from timm.models import PretrainedCfg

from t2t_viz import downloads, zoo
from t2t_viz.downloads import DownloadError, DownloadManager, DownloadStatus, RemoteFile

BODY = os.urandom(3_000_000)


@dataclass
class Route:
    body: bytes = BODY
    status: int = 200
    send_length: bool = True
    extra_length: int = 0  # announce more bytes than are sent, then hang up
    chunk_bytes: int = 1 << 18
    gate: Optional[threading.Event] = None  # when set up, the rest of the body waits for it after one chunk


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.requests.append(self.path)
        route = self.server.routes.get(self.path)
        if route is None or route.status != 200:
            self.send_error(route.status if route else 404)
            return
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        if route.send_length:
            self.send_header('Content-Length', str(len(route.body) + route.extra_length))
        self.end_headers()
        for start in range(0, len(route.body), route.chunk_bytes):
            if route.gate is not None and start > 0:
                route.gate.wait(10)
            self.wfile.write(route.body[start:start + route.chunk_bytes])
            self.wfile.flush()

    def log_message(self, format, *args):
        pass


@dataclass
class Server:
    port: int
    routes: Dict[str, Route] = field(default_factory=dict)
    requests: List[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f'http://127.0.0.1:{self.port}{path}'

    def remote(self, path: str, route: Route = None, sha256_prefix: str = None) -> RemoteFile:
        self.routes[path] = route or Route()
        return RemoteFile(self.url(path), Path(path).name, sha256_prefix)


@pytest.fixture(autouse=True)
def no_proxy_no_offline(monkeypatch):
    for name in (*downloads.OFFLINE_VARIABLES, 'HF_ENDPOINT'):
        monkeypatch.delenv(name, raising=False)
    for name in ('no_proxy', 'NO_PROXY'):  # requests to 127.0.0.1 must not go through a proxy of the machine
        monkeypatch.setenv(name, '*')


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    httpd.daemon_threads = True
    state = Server(httpd.server_address[1])
    httpd.routes, httpd.requests = state.routes, state.requests
    thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield state
    for route in state.routes.values():
        if route.gate is not None:
            route.gate.set()
    httpd.shutdown()
    httpd.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _wait_until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, 'timed out'
        time.sleep(0.01)


def _nothing_left(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


def test_download_reports_progress_and_writes_the_whole_file(server, tmp_path):
    remote = server.remote('/weights/model.bin')
    calls = []
    directory = tmp_path / 'new' / 'checkpoints'  # created on demand

    path = downloads.download(remote, directory, progress=lambda done, total: calls.append((done, total)),
                              chunk_bytes=1 << 18)

    assert path == directory / 'model.bin'
    assert path.read_bytes() == BODY
    assert sorted(p.name for p in directory.iterdir()) == ['model.bin']  # no .part left
    done = [d for d, _ in calls]
    assert done[0] == 0 and done[-1] == len(BODY)
    assert all(a < b for a, b in zip(done, done[1:])) and len(done) >= 12  # at most 256 KiB per step
    assert {total for _, total in calls} == {len(BODY)}


def test_unknown_length_and_existing_file(server, tmp_path):
    remote = server.remote('/no-length.bin', Route(send_length=False))
    calls = []
    path = downloads.download(remote, tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert path.read_bytes() == BODY
    assert {total for _, total in calls} == {None} and calls[-1][0] == len(BODY)
    assert DownloadStatus('running', path, remote.url, 10, None).fraction is None

    path.write_bytes(b'already here')
    assert downloads.download(remote, tmp_path) == path
    assert path.read_bytes() == b'already here' and server.requests == ['/no-length.bin']


def test_sha256_prefix_is_checked(server, tmp_path):
    digest = hashlib.sha256(BODY).hexdigest()
    good = server.remote('/good.pth', sha256_prefix=digest[:8])
    assert downloads.download(good, tmp_path / 'good').read_bytes() == BODY

    wrong_prefix = 'deadbeef' if not digest.startswith('deadbeef') else '01234567'
    bad = server.remote('/bad.pth', sha256_prefix=wrong_prefix)
    with pytest.raises(DownloadError, match='SHA-256') as error:
        downloads.download(bad, tmp_path / 'bad')
    assert wrong_prefix in str(error.value) and digest in str(error.value) and bad.url in str(error.value)
    assert _nothing_left(tmp_path / 'bad')


@pytest.mark.parametrize('route, message', [
    (Route(status=404), 'HTTP 404'),
    (Route(extra_length=1000), f'connection closed after {len(BODY)} of {len(BODY) + 1000} bytes'),
], ids=['not-found', 'closed-early'])
def test_failures_raise_one_line_and_leave_nothing(server, tmp_path, route, message):
    remote = server.remote('/broken.safetensors', route)
    with pytest.raises(DownloadError) as error:
        downloads.download(remote, tmp_path)
    text = str(error.value)
    assert message in text and remote.url in text and '\n' not in text
    assert error.value.url == remote.url
    assert _nothing_left(tmp_path)


def test_unreachable_server_raises(tmp_path):
    remote = RemoteFile(f'http://127.0.0.1:{_closed_port()}/x.pth', 'x.pth')
    with pytest.raises(DownloadError, match='refused'):
        downloads.download(remote, tmp_path, timeout=3)
    assert _nothing_left(tmp_path)


@pytest.mark.skipif(downloads.fcntl is None, reason='no advisory file locks on this system')
def test_part_file_in_use_is_left_to_its_owner(server, tmp_path):
    remote = server.remote('/busy.pth')
    part = tmp_path / 'busy.pth.part'
    with open(part, 'wb') as owner:
        owner.write(b'partial')
        owner.flush()
        downloads.fcntl.flock(owner.fileno(), downloads.fcntl.LOCK_EX)
        with pytest.raises(DownloadError, match='another download'):
            downloads.download(remote, tmp_path)
        assert part.read_bytes() == b'partial' and not (tmp_path / 'busy.pth').exists()
    assert server.requests == []


def test_offline_reason(server, monkeypatch):
    assert downloads.offline_reason(server.url('/anything'), timeout=3) is None

    port = _closed_port()
    reason = downloads.offline_reason(f'http://127.0.0.1:{port}/file.pth', timeout=3)
    assert reason.startswith(f'cannot reach 127.0.0.1:{port}')

    assert downloads.offline_reason('ftp://example.org/file') == 'not an http(s) URL: ftp://example.org/file'

    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    assert 'T2T_VIZ_OFFLINE=1' in downloads.offline_reason(server.url('/anything'))


def test_offline_reason_probes_the_proxy(server, monkeypatch):
    for name in ('no_proxy', 'NO_PROXY'):
        monkeypatch.delenv(name)
    monkeypatch.setenv('https_proxy', f'http://127.0.0.1:{server.port}')
    assert downloads.offline_reason('https://weights.invalid/model.safetensors') is None
    monkeypatch.setenv('https_proxy', f'http://127.0.0.1:{_closed_port()}')
    assert 'cannot reach 127.0.0.1' in downloads.offline_reason('https://weights.invalid/model.safetensors')


def test_remote_file_for_release_and_hub_weights(monkeypatch, tmp_path):
    release = downloads.remote_file(timm.models.get_pretrained_cfg('t2t_vit_24.in1k'), 't2t_vit_24.in1k')
    assert release == RemoteFile(
        'https://github.com/yitu-opensource/T2T-ViT/releases/download/main/82.3_T2T_ViT_24.pth.tar',
        '82.3_T2T_ViT_24.pth.tar')

    resnet_cfg = timm.models.get_pretrained_cfg('resnet50.tv_in1k')
    hub = downloads.remote_file(resnet_cfg, 'resnet50.tv_in1k')
    assert hub == RemoteFile('https://huggingface.co/timm/resnet50.tv_in1k/resolve/main/model.safetensors',
                             'resnet50.tv_in1k.safetensors')
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:8080/mirror/')
    assert downloads.remote_file(resnet_cfg, 'resnet50.tv_in1k').url == \
        'http://127.0.0.1:8080/mirror/timm/resnet50.tv_in1k/resolve/main/model.safetensors'

    for name, remote in (('t2t_vit_24.in1k', release), ('resnet50.tv_in1k', hub)):
        assert tmp_path / remote.filename in zoo.checkpoint_candidates(name, tmp_path)


def test_remote_file_names_and_hashes():
    torch_hub = downloads.remote_file(
        PretrainedCfg(url='https://example.org/weights/jx_vit_large_p16_384-b3be5167.pth'), 'vit_large_patch16_384')
    assert torch_hub.filename == 'jx_vit_large_p16_384-b3be5167.pth' and torch_hub.sha256_prefix == 'b3be5167'
    npz = downloads.remote_file(PretrainedCfg(url='https://example.org/L_16-i21k-sd_0.1-res_224.npz'), 'vit')
    assert npz.sha256_prefix is None
    bin_file = downloads.remote_file(
        PretrainedCfg(hf_hub_id='org/repo', hf_hub_filename='open_clip_pytorch_model.bin'), 'clip.tag')
    assert bin_file.filename == 'clip.tag.bin'
    assert bin_file.url == 'https://huggingface.co/org/repo/resolve/main/open_clip_pytorch_model.bin'
    revision = downloads.remote_file(PretrainedCfg(hf_hub_id='org/repo@v2'), 'model.tag')
    assert revision.url == 'https://huggingface.co/org/repo/resolve/v2/model.safetensors'
    assert downloads.remote_file(PretrainedCfg(), 'resnet18') is None


def test_manager_shares_one_download_and_reports_progress(server, tmp_path):
    gate = threading.Event()
    remote = server.remote('/shared.safetensors', Route(chunk_bytes=1 << 16, gate=gate))
    manager = DownloadManager()
    assert manager.status(remote, tmp_path) is None

    first = manager.start(remote, tmp_path)
    assert first.state == 'running' and first.path == (tmp_path / 'shared.safetensors').resolve()
    _wait_until(lambda: manager.status(remote, tmp_path).done_bytes >= 1 << 16)
    midway = manager.status(remote, tmp_path)
    assert midway.state == 'running' and midway.total_bytes == len(BODY)
    assert 0 < midway.done_bytes < len(BODY) and 0 < midway.fraction < 1
    assert not midway.path.exists()

    second = manager.start(remote, tmp_path)  # another session asks for the same file
    assert second.state == 'running'
    gate.set()
    final = manager.wait(remote, tmp_path, timeout=10)
    assert final == manager.status(remote, tmp_path)
    assert final.state == 'done' and final.fraction == 1.0 and final.done_bytes == len(BODY)
    assert final.path.read_bytes() == BODY
    assert server.requests == ['/shared.safetensors']

    assert manager.start(remote, tmp_path).state == 'done' and server.requests == ['/shared.safetensors']
    assert downloads.manager() is downloads.manager()


def test_manager_failed_download_can_be_restarted(server, tmp_path):
    remote = server.remote('/flaky.pth', Route(status=500))
    manager = DownloadManager()
    manager.start(remote, tmp_path)
    failed = manager.wait(remote, tmp_path, timeout=10)
    assert failed.state == 'failed' and 'HTTP 500' in failed.error and remote.url in failed.error
    assert failed.fraction is None and _nothing_left(tmp_path)

    server.routes['/flaky.pth'] = Route()
    manager.start(remote, tmp_path)
    done = manager.wait(remote, tmp_path, timeout=10)
    assert done.state == 'done' and done.error == '' and done.path.read_bytes() == BODY
    assert server.requests == ['/flaky.pth', '/flaky.pth']


def test_manager_reports_a_file_already_present(server, tmp_path):
    remote = server.remote('/present.pth')
    (tmp_path / 'present.pth').write_bytes(b'12345')
    status = DownloadManager().start(remote, tmp_path)
    assert (status.state, status.done_bytes, status.total_bytes) == ('done', 5, 5)
    assert server.requests == []
