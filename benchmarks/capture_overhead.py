"""Full capture vs the bare forward pass, per default model at 224 on the CPU; and stats CLI throughput.

    python -m benchmarks.capture_overhead [--models resnet50 vit_large_patch16_224 t2t_vit_24] [--repeats 11]
                                          [--stats-images 16] [--glibc-defaults]

Target: capture overhead <= 15% over the bare forward pass (same run, same input, medians; the two are
timed alternately so that a machine getting slower or faster affects both alike).
Weights do not change the timing, so random initialisation is used when no trained file is present.
Like the CLI and the app, the benchmark keeps freed memory for reuse (t2t_viz.allocator);
--glibc-defaults measures with the C library's defaults instead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image
from skimage import data

from t2t_viz import capture, zoo
from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.zoo import DEFAULT_MODELS

from .timing import round_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--repeats', type=int, default=11)
    parser.add_argument('--stats-images', type=int, default=16, help='0 skips the stats CLI measurement')
    parser.add_argument('--glibc-defaults', action='store_true', help="keep the C library's malloc settings")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.glibc_defaults or not reuse_freed_memory() else "freed memory reused"
    x = torch.randn(1, 3, 224, 224)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, {allocator}')
    print(f"{'model':<24}{'forward ms':>12}{'capture ms':>12}{'overhead':>10}{'layers':>8}")
    for name in args.models:
        model = zoo.load(name, img_size=224, device='cpu', allow_download=False).model

        def bare():
            with torch.inference_mode():
                model(x)

        times = round_times([bare, lambda: capture.run(model, x)], args.repeats)
        forward_s, capture_s = map(statistics.median, times)
        layers = len(capture.run(model, x)[0].layers)
        print(f'{name:<24}{forward_s * 1e3:>12.1f}{capture_s * 1e3:>12.1f}'
              f'{(capture_s / forward_s - 1) * 100:>9.1f}%{layers:>8}', flush=True)

    if args.stats_images:
        with tempfile.TemporaryDirectory() as folder:
            photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
            for i in range(args.stats_images):
                Image.fromarray(photos[i % len(photos)]).save(os.path.join(folder, f'{i:03d}.png'))
            command = [sys.executable, '-m', 't2t_viz', 'stats', folder, '-o', os.path.join(folder, 's.csv')]
            for name in args.models:
                command += ['--model', name]
            start = time.perf_counter()
            subprocess.run(command, check=True, env={**os.environ, 'T2T_VIZ_OFFLINE': '1'},
                           stderr=subprocess.DEVNULL)
            elapsed = time.perf_counter() - start
        print(f'stats CLI: {args.stats_images} images x {len(args.models)} models in {elapsed:.1f}s '
              f'= {args.stats_images / elapsed:.2f} images/s (model loading included)')


if __name__ == '__main__':
    main()
