"""One real-browser test: `streamlit run app.py` driven by headless Chromium through Playwright."""
import csv
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = '/usr/bin/chromium'
SCREENSHOTS = ROOT / 'artifacts' / 'screenshots'

playwright_api = pytest.importorskip('playwright.sync_api')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    if not os.path.exists(CHROMIUM):
        pytest.skip('Debian chromium is not installed (scripts/run_tests.sh installs it)')
    port = _free_port()
    env = {**os.environ, 'T2T_VIZ_MODELS': 'resnet18,vit_tiny_patch16_224,t2t_vit_7', 'T2T_VIZ_OFFLINE': '1'}
    process = subprocess.Popen(
        [sys.executable, '-m', 'streamlit', 'run', str(ROOT / 'app.py'), '--server.headless', 'true',
         '--server.port', str(port), '--server.address', '127.0.0.1', '--server.fileWatcherType', 'none',
         '--browser.gatherUsageStats', 'false'],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f'http://127.0.0.1:{port}'
    process.terminate()
    process.wait(timeout=20)


def test_upload_grid_stages_and_csv(server, chelsea, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image_path = tmp_path / 'cat.png'
    chelsea.save(image_path)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'])
        page = browser.new_page(viewport={'width': 1400, 'height': 1000}, accept_downloads=True)
        page.goto(server)
        page.get_by_text('Upload', exact=True).click()
        page.locator('input[type="file"]').set_input_files(str(image_path))
        page.get_by_role('tab', name='Feature maps').wait_for(timeout=180_000)
        page.locator('[data-testid="stImage"] img').first.wait_for(timeout=180_000)
        page.screenshot(path=str(SCREENSHOTS / 'feature_maps.png'), full_page=True)

        for tab in ('Compare', 'T2T stages', 'Dead channels', 'Predictions'):
            page.get_by_role('tab', name=tab).click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(SCREENSHOTS / f"{tab.lower().replace(' ', '_')}.png"), full_page=True)
            if tab == 'T2T stages':
                text = page.locator('p', has_text='Tokens:').first.inner_text()
                assert '3136' in text and '784' in text and '196' in text
            if tab == 'Dead channels':
                with page.expect_download() as download_info:
                    page.get_by_role('button', name='Download CSV').click()
                content = Path(download_info.value.path()).read_text()
        browser.close()

    rows = list(csv.DictReader(io.StringIO(content)))
    assert content.startswith('image,model,weights,layer,kind,depth,height,width,tokens,channels,dead,'
                              'dead_fraction,flat,massive,dead_ids,massive_ids')
    assert {r['model'] for r in rows} == {'resnet18', 'vit_tiny_patch16_224', 't2t_vit_7'}
    assert {r['image'] for r in rows} == {'cat.png'} and {r['weights'] for r in rows} == {'random'}
    assert len(rows) == 21 + 13 + 13
