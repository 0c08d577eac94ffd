"""Cold start of the app with the trio's weight files present, in a real browser, against its floor.

    python -m benchmarks.cold_start [--models resnet50.tv_in1k ...] [--checkpoints DIR] [--later-starts 3]

Measured in one run:
- **total**: from starting `streamlit run app.py` to the first channel grid of every model in Chromium;
- **floor**: in a fresh process started just before each server start, importing the page module +
  reading the weight files + the first bare forward pass of each model at 224 (as a fresh server must
  do); each start is held against its own floor, since this 2-core machine's speed drifts;
- **load vs read**: per model, in a fresh process, ``zoo.load`` (the model's skeleton built on the meta
  device or unpickled, the file's tensors assigned) against reading its file alone; both end with every
  weight in memory, since mapped tensors (``.safetensors`` files, and zip-format ones in ``zoo.load``)
  are otherwise read only when first used. Each round starts with an empty cache folder: its first process
  builds the skeleton and keeps it, the second (every process after it) unpickles it. A process reports
  its first load and the best of two, against the best of two reads.
Goals: total <= 1.5x the floor; each load <= 1.5x the time to read its file. The first start also traces
the models' memory estimates and builds their skeletons (kept on disk); later starts, what every start
after it costs, are reported one by one and as their median.

Weight files in the release layouts are written once with the models' random initialisation
(``--checkpoints``, default a folder under the system's temporary directory) when the real ones are not
there: time does not depend on the values. Other benchmarks use this folder through T2T_VIZ_CHECKPOINTS.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import timm
import torch

from t2t_viz import zoo
from t2t_viz.models import read_checkpoint

from .browser import ROOT, app_server, chromium_page

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


def _load_seconds(name: str) -> float:
    """``zoo.load`` and every weight in memory (a loaded file's tensors are mapped, read when first used)."""
    start = time.perf_counter()
    model = zoo.load(name, img_size=224, device='cpu', allow_download=False).model
    _page_in(itertools.chain(model.parameters(), model.buffers()))
    return time.perf_counter() - start


_LOAD_CODE = """import json, sys
from pathlib import Path
from benchmarks.cold_start import _load_seconds, _read_seconds
name, path = sys.argv[1], Path(sys.argv[2])
reads = [_read_seconds(path) for _ in range(2)]
loads = [_load_seconds(name) for _ in range(2)]
print(json.dumps([min(reads), loads[0], min(loads)]))
"""


def _in_fresh_process(code: str, arguments: List[str], env: Optional[Dict[str, str]] = None):
    """What ``code``, run in a new Python process from the repository root, printed as JSON on its last line."""
    output = subprocess.check_output([sys.executable, '-c', code, *arguments], text=True, cwd=ROOT, env=env)
    return json.loads(output.strip().splitlines()[-1])


def _read_and_load_in_fresh_process(name: str, path: Path, cache: str) -> List[float]:
    """In a new process with the cache folder ``cache``: the best of two reads of the file, then the first
    load of the model and the best of two (both best-of-two leave out the process's one-time costs)."""
    return _in_fresh_process(_LOAD_CODE, [name, str(path)], dict(os.environ, T2T_VIZ_CACHE_DIR=cache))


def _floor(models: List[str], files: Dict[str, Path], import_seconds: float) -> Dict[str, float]:
    """The rest of the floor, in the fresh process that imported the page module: reading the files and
    the first bare forwards."""
    parts = {'import': import_seconds, 'read': 0.0, 'forward': 0.0}
    for name in models:
        parts['read'] += _read_seconds(files[name])
        model = zoo.load(name, img_size=224, device='cpu', allow_download=False).model
        x = torch.randn(1, 3, 224, 224)
        with torch.inference_mode():
            start = time.perf_counter()
            model(x)  # the first pass, with its one-time costs, as in a fresh server
            parts['forward'] += time.perf_counter() - start
        del model
    return parts


_FLOOR_CODE = """import time
start = time.perf_counter()
import t2t_viz.ui.explore  # the page module, as the server imports it, first thing in a fresh process
import_seconds = time.perf_counter() - start
import json, sys
from pathlib import Path
from benchmarks.cold_start import _floor
models, files = sys.argv[1::2], [Path(f) for f in sys.argv[2::2]]
print(json.dumps(_floor(models, dict(zip(models, files)), import_seconds)))
"""


def _floor_in_fresh_process(files: Dict[str, Path]) -> Dict[str, float]:
    return _in_fresh_process(_FLOOR_CODE, [str(item) for name, path in files.items() for item in (name, path)])


def _server_start_seconds(env: Dict[str, str]) -> float:
    with chromium_page() as page:
        start = time.perf_counter()
        with app_server(env) as (url, _, _):
            page.goto(url)
            page.get_by_text('Results for chelsea.png').wait_for(timeout=600_000)
            page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first.wait_for(timeout=600_000)
            return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(zoo.PRESETS['paper']))
    parser.add_argument('--checkpoints', default=os.path.join(tempfile.gettempdir(), 't2t_viz_bench_checkpoints'))
    parser.add_argument('--later-starts', type=int, default=3, help='server starts after the first (median)')
    parser.add_argument('--load-rounds', type=int, default=3, help='first and later load per model (median)')
    args = parser.parse_args()
    folder = Path(args.checkpoints)
    folder.mkdir(parents=True, exist_ok=True)
    os.environ['T2T_VIZ_CHECKPOINTS'] = str(folder)
    files = {name: _release_file(name, folder) for name in args.models}

    print(f"{'model':<42}{'skeleton':<10}{'read s':>8}{'1st load s':>11}{'ratio':>7}{'best load s':>12}{'ratio':>7}")
    for name, path in files.items():
        later = []
        for _ in range(args.load_rounds):
            with tempfile.TemporaryDirectory() as cache:
                for skeleton in ('built', 'unpickled'):  # the first process builds and keeps it
                    read, first, best = _read_and_load_in_fresh_process(name, path, cache)
                    print(f'{name:<42}{skeleton:<10}{read:>8.3f}{first:>11.3f}{first / read:>6.2f}x'
                          f'{best:>12.3f}{best / read:>6.2f}x', flush=True)
                later.append((first / read, best / read))
        if later:
            first_ratio, best_ratio = (statistics.median(ratios) for ratios in zip(*later))
            print(f'{name}, skeleton unpickled: median {first_ratio:.2f}x the read for the first load, '
                  f'{best_ratio:.2f}x for the best of two (goal <= 1.5x)', flush=True)

    env = {'T2T_VIZ_MODELS': ','.join(args.models), 'T2T_VIZ_OFFLINE': '1', 'T2T_VIZ_CHECKPOINTS': str(folder)}
    later = []
    with tempfile.TemporaryDirectory() as cache:
        env['T2T_VIZ_CACHE_DIR'] = cache  # no memory estimates on disk before the first start
        for number in range(1 + args.later_starts):
            parts = _floor_in_fresh_process(files)  # just before the start it is held against
            floor = sum(parts.values())
            total = _server_start_seconds(env)
            kind = 'first start' if number == 0 else f'later start {number}'
            print(f"{kind}: server start to the first grids in the browser {total:.1f} s; floor = import "
                  f"{parts['import']:.1f} s + reading files {parts['read']:.1f} s + first bare forwards "
                  f"{parts['forward']:.1f} s = {floor:.1f} s; {total / floor:.2f}x (goal <= 1.5x)", flush=True)
            if number:
                later.append(total / floor)
    if later:
        print(f'later starts: median {statistics.median(later):.2f}x the floor (goal <= 1.5x)')


if __name__ == '__main__':
    main()
