"""What the browser-driven benchmarks share: a `streamlit run app.py` server, Chromium, the server's memory."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextmanager
def app_server(env: Optional[Dict[str, str]] = None) -> Iterator[Tuple[str, subprocess.Popen, float]]:
    """The README's `streamlit run app.py`; yields (url, process, seconds until the port accepted)."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, '-m', 'streamlit', 'run', 'app.py', '--server.headless', 'true', '--server.port', str(port),
         '--server.address', '127.0.0.1'], cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.perf_counter() - started > 120:
                    raise RuntimeError('the app server did not start')
                time.sleep(0.05)
        yield f'http://127.0.0.1:{port}', process, time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={'width': width, 'height': height}, accept_downloads=True)
        finally:
            browser.close()


def rss_bytes(pid: int) -> int:
    """Resident memory of a process now (VmRSS)."""
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'no VmRSS for process {pid}')


def choose(page, label: str, option: str) -> None:
    """Pick an option of a Streamlit selectbox by its label (typed, then Enter)."""
    box = page.get_by_role('combobox', name=label, exact=True)
    box.click()
    box.fill(option)
    page.get_by_role('option', name=option, exact=True).click()
