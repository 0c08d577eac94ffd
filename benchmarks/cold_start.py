"""Cold start of the app with the trio's weight files present, in a real browser, against its floor.

    python -m benchmarks.cold_start [--models resnet50.tv_in1k ...] [--checkpoints DIR]

Measured in one run:
- **total**: from starting `streamlit run app.py` to the first channel grid of every model in Chromium;
- **floor**: importing the page module in a fresh process + reading the weight files + the first bare
  forward pass of each model at 224 (as a fresh server must do), each measured on its own;
- **load vs read**: per model, ``zoo.load`` (build on the meta device, assign the file's tensors) against
  reading its file alone; both end with every weight in memory, since mapped tensors (``.safetensors``
  files, and zip-format ones in ``zoo.load``) are otherwise read only when first used.
Goals: total <= 1.5x the floor; each load <= 1.5x the time to read its file. The server is started twice:
the first start also traces the models' memory estimates (kept on disk for later starts), the second
is what every later start costs.

Weight files in the release layouts are written once with the models' random initialisation
(``--checkpoints``, default a folder under the system's temporary directory) when the real ones are not
there: time does not depend on the values. Other benchmarks use this folder through T2T_VIZ_CHECKPOINTS.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Tuple

import timm
import torch
import torch.nn as nn

from t2t_viz import zoo
from t2t_viz.models import read_checkpoint

from .browser import app_server, chromium_page

PAGE_BYTES = 4096


def _release_file(name: str, folder: Path) -> Path:
    """The file the checkpoint lookup finds for ``name``, written with random values in its release layout."""
    remote = zoo.remote_weights(name)
    path = folder / remote.filename
    if path.exists():
        return path
    state = timm.create_model(name).state_dict()  # the model's own random initialisation: finite, varied maps
    if path.suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(state, str(path))
    elif name.startswith('t2t_vit'):
        torch.save({'state_dict_ema': state, 'epoch': 309}, path)  # a training checkpoint, as released
    else:
        torch.save(state, path)
    return path


def _page_in(tensors: Iterable[torch.Tensor]) -> None:
    """Read one value in every page of each tensor, so that the bytes of a mapped file are really read."""
    for tensor in tensors:
        if tensor.numel():
            tensor.reshape(-1)[::max(1, PAGE_BYTES // tensor.element_size())].sum()


def _tensors(checkpoint: dict) -> Iterator[torch.Tensor]:
    for value in checkpoint.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            yield from _tensors(value)


def _read_seconds(path: Path) -> float:
    """Reading the file: every tensor in memory (``.safetensors`` files are otherwise only mapped)."""
    start = time.perf_counter()
    _page_in(_tensors(read_checkpoint(path)))
    return time.perf_counter() - start


def _load_seconds(name: str) -> Tuple[float, nn.Module]:
    """``zoo.load`` and every weight in memory (a loaded file's tensors are mapped, read when first used)."""
    start = time.perf_counter()
    model = zoo.load(name, img_size=224, device='cpu', allow_download=False).model
    _page_in(model.state_dict().values())
    return time.perf_counter() - start, model


def _import_seconds() -> float:
    code = 'import time; t = time.perf_counter(); import t2t_viz.ui.explore; print(time.perf_counter() - t)'
    return float(subprocess.check_output([sys.executable, '-c', code], text=True).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(zoo.PRESETS['paper']))
    parser.add_argument('--checkpoints', default=os.path.join(tempfile.gettempdir(), 't2t_viz_bench_checkpoints'))
    args = parser.parse_args()
    folder = Path(args.checkpoints)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ['T2T_VIZ_CHECKPOINTS'] = str(folder)
    files = {name: _release_file(name, folder) for name in args.models}

    print(f"{'model':<42}{'read s':>8}{'load s':>8}{'ratio':>7}{'forward s':>11}")
    read_total = forward_total = 0.0
    for name, path in files.items():
        read = min(_read_seconds(path) for _ in range(2))
        load, model = _load_seconds(name)
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)  # the first pass, with its one-time costs, as in a fresh server
            forward = time.perf_counter() - start
        read_total += read
        forward_total += forward
        print(f'{name:<42}{read:>8.3f}{load:>8.3f}{load / read:>6.2f}x{forward:>11.2f}', flush=True)
        del model

    import_s = _import_seconds()
    floor = import_s + read_total + forward_total
    env = {'T2T_VIZ_MODELS': ','.join(args.models), 'T2T_VIZ_OFFLINE': '1', 'T2T_VIZ_CHECKPOINTS': str(folder)}
    print(f'floor: import {import_s:.1f} s + reading files {read_total:.1f} s + first bare forwards '
          f'{forward_total:.1f} s = {floor:.1f} s')
    with tempfile.TemporaryDirectory() as cache:
        env['T2T_VIZ_CACHE_DIR'] = cache  # no memory estimates on disk before the first start
        for start_number in ('first', 'later'):
            with chromium_page() as page:
                start = time.perf_counter()
                with app_server(env) as (url, _, _):
                    page.goto(url)
                    page.get_by_text('Results for chelsea.png').wait_for(timeout=600_000)
                    page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for(timeout=600_000)
                    total = time.perf_counter() - start
            print(f'{start_number} start, server start to the first grids in the browser: {total:.1f} s = '
                  f'{total / floor:.2f}x the floor (goal <= 1.5x)', flush=True)


if __name__ == '__main__':
    main()
