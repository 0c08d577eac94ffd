"""One real-browser test: plain `streamlit run app.py` driven by headless Chromium through Playwright."""
import contextlib
import csv
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from planted import resnet18_with_dead_stem_channels

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = '/usr/bin/chromium'
SCREENSHOTS = ROOT / 'artifacts' / 'screenshots'
MODELS = ('resnet18', 'vit_tiny_patch16_224', 't2t_vit_7')

playwright_api = pytest.importorskip('playwright.sync_api')


def _resnet18_with_dead_stem_channels(folder: Path) -> None:
    """A resnet18 weights file whose stem channels 3 and 7 are exactly zero after the ReLU on every image."""
    folder.mkdir(exist_ok=True)
    torch.save(resnet18_with_dead_stem_channels().state_dict(), folder / 'resnet18.pth')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def server_log(tmp_path) -> Path:
    return tmp_path / 'server.log'


@pytest.fixture
def server(tmp_path, server_log):
    if not os.path.exists(CHROMIUM):
        pytest.skip('Debian chromium is not installed (scripts/run_tests.sh installs it)')
    port = _free_port()
    env = {**os.environ, 'T2T_VIZ_MODELS': ','.join(MODELS), 'T2T_VIZ_OFFLINE': '1',
           'T2T_VIZ_CHECKPOINTS': str(tmp_path / 'checkpoints')}
    # the plain command of the README (settings from .streamlit/config.toml), on a free local port
    log = open(server_log, 'w')
    process = subprocess.Popen(
        [sys.executable, '-m', 'streamlit', 'run', 'app.py', '--server.headless', 'true', '--server.port', str(port),
         '--server.address', '127.0.0.1'], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
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
    log.close()


@contextlib.contextmanager
def _explained(page, server_log: Path):
    """On a failure, save a screenshot and add what the page showed and what the server logged."""
    try:
        yield
    except Exception as e:
        try:
            page.screenshot(path=str(SCREENSHOTS / 'failure.png'), full_page=True)
            shown = page.locator('body').inner_text(timeout=10_000)[-3000:]
        except Exception as unreadable:  # a crashed page: the server's log may still say why
            shown = f'(not readable: {unreadable})'
        logged = server_log.read_text()[-5000:]
        raise AssertionError(f'{e}\n--- the page showed:\n{shown}\n--- the server logged:\n{logged}') from e


def _idle(page) -> None:
    """Wait until the app's script has finished running (Streamlit's running indicator is gone)."""
    page.wait_for_timeout(300)  # the indicator appears shortly after a rerun starts
    page.locator('[data-testid="stStatusWidgetRunningIcon"]').wait_for(state='detached', timeout=120_000)


def _download(page, name: str) -> str:
    with page.expect_download() as download_info:
        page.get_by_role('button', name=name).click()
    return Path(download_info.value.path()).read_text()


def test_upload_grid_stages_csv_and_dataset_mode(server, server_log, chelsea, tmp_path):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    image_path = tmp_path / 'cat.png'
    chelsea.save(image_path)
    batch = []
    for name, load in (('coffee', data.coffee), ('rocket', data.rocket), ('astronaut', data.astronaut)):
        batch.append(tmp_path / f'{name}.png')
        Image.fromarray(load()).resize((160, 120)).save(batch[-1])
    (tmp_path / 'broken.png').write_bytes(b'not an image')
    _resnet18_with_dead_stem_channels(tmp_path / 'checkpoints')  # read when the first page loads the models
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
            '--disable-background-networking', '--disable-component-update', '--disable-sync'])
        page = browser.new_page(viewport={'width': 1400, 'height': 1000}, accept_downloads=True)
        page.goto(server)
        with _explained(page, server_log):
            # the uploader is on the first screen: drop the file without any other click
            page.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(image_path))
            page.get_by_role('tab', name='Feature maps').wait_for(timeout=180_000)
            page.locator('[data-testid="stImage"] img').first.wait_for(timeout=180_000)
            page.get_by_text('Results for cat.png').wait_for(timeout=180_000)
            _idle(page)
            page.screenshot(path=str(SCREENSHOTS / 'feature_maps.png'), full_page=True)

            for tab in ('Compare', 'Procedures', 'T2T stages', 'Norms & massive', 'Dead channels', 'Predictions'):
                page.get_by_role('tab', name=tab).click(timeout=60_000)
                page.locator('[role="tab"][aria-selected="true"]', has_text=tab).wait_for(timeout=30_000)
                _idle(page)
                page.screenshot(path=str(SCREENSHOTS / f"{tab.lower().replace(' ', '_').replace('&', 'and')}.png"),
                                full_page=True)
                if tab == 'T2T stages':
                    text = page.locator('p', has_text='Tokens:').first.inner_text(timeout=60_000)
                    assert '3136' in text and '784' in text and '196' in text
                if tab == 'Dead channels':
                    single = _download(page, 'Download CSV')

            page.get_by_role('tab', name='Ablation').click(timeout=60_000)  # resnet18, conv1, dead channels
            page.get_by_text('2 dead channel(s) of 64').wait_for(timeout=60_000)
            page.get_by_role('button', name='Ablate').click()
            page.get_by_text('No change: every logit is exactly as in the untouched pass.').wait_for(timeout=120_000)
            page.get_by_text('2 channel(s) of conv1 zeroed').wait_for(timeout=10_000)
            _idle(page)
            page.screenshot(path=str(SCREENSHOTS / 'ablation.png'), full_page=True)

            page.get_by_role('link', name='Dataset statistics').click()
            images_uploader = page.locator('[data-testid="stFileUploader"]', has_text='Images, or .zip files')
            images_uploader.locator('input[type="file"]').set_input_files(
                [str(path) for path in batch] + [str(tmp_path / 'broken.png')])
            page.get_by_role('button', name='Run').click()
            page.get_by_text('3 images through 3 model(s)').wait_for(timeout=180_000)
            page.get_by_text('broken.png').first.wait_for(timeout=10_000)
            per_image = _download(page, 'Download per-image CSV')
            per_channel = _download(page, 'Download per-channel CSV')
            channel = page.get_by_label('Channel', exact=True)
            channel.fill('5')
            channel.press('Enter')
            page.get_by_text('Top 3 images of conv1 channel 5').wait_for(timeout=120_000)
            _idle(page)
            strip = page.locator('[data-testid="stImage"]', has_text='at row ')
            assert strip.count() == 3, strip.count()
            for index in range(3):  # each drawn: the image with its box, the box enlarged, the map over it
                assert strip.nth(index).locator('img').evaluate('i => i.complete && i.naturalHeight') == 3 * 160 + 8
            page.screenshot(path=str(SCREENSHOTS / 'dataset.png'), full_page=True)
        browser.close()

    rows = list(csv.DictReader(io.StringIO(single)))
    assert single.startswith('image,model,weights,layer,kind,depth,height,width,tokens,channels,dead,'
                             'dead_fraction,flat,massive,dead_ids,massive_ids')
    assert {r['model'] for r in rows} == set(MODELS)
    assert {r['image'] for r in rows} == {'cat.png'}
    assert {(r['model'], r['weights']) for r in rows} == {('resnet18', 'trained'), ('vit_tiny_patch16_224', 'random'),
                                                          ('t2t_vit_7', 'random')}
    assert len(rows) == 21 + 13 + 13
    dataset_rows = list(csv.DictReader(io.StringIO(per_image)))
    assert {r['image'] for r in dataset_rows} == {'coffee.png', 'rocket.png', 'astronaut.png'}
    assert len(dataset_rows) == 3 * (21 + 13 + 13)
    channel_rows = list(csv.DictReader(io.StringIO(per_channel)))
    assert {r['images'] for r in channel_rows} == {'3'} and {r['model'] for r in channel_rows} == set(MODELS)
