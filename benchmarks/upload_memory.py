"""The app server's memory over many uploads at one input size, in one browser session.

    python -m benchmarks.upload_memory [--uploads 12] [--size 1024] [--models resnet50.tv_in1k ...]

Serves the app as the README does, uploads ``--uploads`` different photographs one after another in a
real browser (Chromium), waits for the first grid of every model after each, and reads the server's
resident memory. Goal: after the third upload the server grows by at most 2 GB, however many follow
(results are kept in a byte-budgeted store, 25% of the available memory unless T2T_VIZ_CACHE_BYTES says).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from t2t_viz.zoo import PRESETS

from .browser import app_server, choose, chromium_page, rss_bytes

_PHOTOS = ('astronaut', 'coffee', 'rocket', 'immunohistochemistry', 'hubble_deep_field', 'retina', 'colorwheel',
           'moon', 'coins', 'camera', 'brick', 'grass')  # not chelsea (= cat), the sample the app opens on


def _photos(count: int, folder: Path):
    """``count`` different photographs from scikit-image (varied by flipping when more are asked for)."""
    paths = []
    for i in range(count):
        name = _PHOTOS[i % len(_PHOTOS)]
        image = getattr(data, name)()
        image = image[0] if isinstance(image, tuple) else image
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]
        if i >= len(_PHOTOS):
            image = image[:, ::-1]
        paths.append(folder / f'{i:02d}_{name}.png')
        Image.fromarray(np.ascontiguousarray(image)).save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--uploads', type=int, default=12)
    parser.add_argument('--size', default='1024')
    parser.add_argument('--models', nargs='+', default=list(PRESETS['paper']))
    args = parser.parse_args()
    env = {'T2T_VIZ_MODELS': ','.join(args.models), 'T2T_VIZ_OFFLINE': '1'}
    with tempfile.TemporaryDirectory() as folder, app_server(env) as (url, server, _), chromium_page() as page:
        photos = _photos(args.uploads, Path(folder))
        page.goto(url)
        page.get_by_text('Results for chelsea.png').wait_for(timeout=600_000)
        choose(page, 'Input size', args.size)
        page.get_by_text(f'at {args.size}x{args.size}').wait_for(timeout=1_800_000)
        print(f'server RSS after start (sample at 224): {rss_bytes(server.pid) / 2**30:.2f} GiB', flush=True)
        print(f"{'upload':>6}  {'image':<30}{'seconds':>9}{'RSS GiB':>9}{'since 3rd':>11}")
        third = None
        for i, photo in enumerate(photos, 1):
            start = time.perf_counter()
            page.locator('[data-testid="stSidebar"] input[type="file"]').set_input_files(str(photo))
            page.get_by_text(f'Results for {photo.name} ').wait_for(timeout=1_800_000)
            page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for(timeout=60_000)
            rss = rss_bytes(server.pid)
            third = rss if i == 3 else third
            growth = f'{(rss - third) / 2**30:>10.2f}G' if third is not None else ''
            print(f'{i:>6}  {photo.name:<30}{time.perf_counter() - start:>9.1f}{rss / 2**30:>9.2f}{growth}', flush=True)
        if third is not None:
            print(f'growth after the third upload: {(rss - third) / 2**30:.2f} GiB (goal: at most 2 GB)')


if __name__ == '__main__':
    main()
