"""What a user waits for beyond the bare forward pass, per default model and input size on the CPU; and the
stats CLI's throughput.

    python -m benchmarks.capture_overhead [--models resnet50.tv_in1k ...] [--sizes 224 1024] [--repeats 7]
                                          [--stats-images 16] [--glibc-defaults]

For each model and size, one photo is timed four ways, alternately, round after round (a machine getting
slower or faster affects all alike), medians of the rounds:

* ``forward``: the photo preprocessed and run through the model, nothing else (the baseline);
* ``capture``: the same pass with every layer hooked and its display copy kept as the app keeps it
  (float16, at most 128 pixels a side), no statistics: what capturing costs before any statistic;
* ``app``: :func:`t2t_viz.pipeline.inspect_images` as the app calls it (float16 display copies of at most
  128 pixels a side, every statistic from the full maps, the layer summaries);
* ``cli``: as ``t2t-viz stats`` calls it (statistics only, no maps kept) and its CSV rows.

Under each row, the middle half of the rounds' own ratios (each call over the forward of its round) shows
how much the medians can move from run to run.

Goals: ``capture`` <= 1.15x, ``app`` and ``cli`` <= 1.25x the forward at 224 and at 1024. TorchLens'
``log_forward_pass`` (every operation kept) is a reference row when it is installed (it is not a dependency).
``THP_MEM_ALLOC_ENABLE=1`` in the environment gives PyTorch 2 MB pages, as the app asks for (README, Memory);
``T2T_VIZ_FUSED=0`` measures PyTorch's reductions instead of the fused CPU kernels. Weights do not change the
forward's time, but the median's search depends on the values: trained weights
are used when their files are present (the rows say which), else each model's random initialisation.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from PIL import Image
from skimage import data

from t2t_viz import capture, kernels, zoo
from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.images import preprocess_batch
from t2t_viz.pipeline import DISPLAY_DTYPE, DISPLAY_SIDE, inspect_images
from t2t_viz.stats import write_csv
from t2t_viz.zoo import DEFAULT_MODELS

from .timing import round_times


def _torchlens_call(model, x):
    try:
        import torchlens
    except ImportError:
        return None
    return lambda: torchlens.log_forward_pass(model, x, layers_to_save='all', vis_opt='none')


def _middle_half(samples, forward_samples) -> str:
    """The interquartile range of a call's time over the forward's in the same round: how far one run's
    ratio (a median of the rounds) can be trusted on a machine whose speed drifts."""
    ratios = sorted(call / forward for call, forward in zip(samples, forward_samples))
    if len(ratios) < 2:
        return f'{ratios[0]:.2f}x'
    low, _, high = statistics.quantiles(ratios, n=4)
    return f'{low:.2f}-{high:.2f}x'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS))
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 1024])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--stats-images', type=int, default=16, help='0 skips the stats CLI measurement')
    parser.add_argument('--glibc-defaults', action='store_true', help="keep the C library's malloc settings")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.glibc_defaults or not reuse_freed_memory() else "freed memory reused"
    photo = Image.fromarray(data.chelsea())
    pages = '2 MB pages' if os.environ.get('THP_MEM_ALLOC_ENABLE') == '1' else '4 KB pages'
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}, {allocator}, '
          f'{pages}, statistics by {"fused CPU kernels" if kernels.fused_available() else "PyTorch"}')
    print(f"{'model':<44}{'size':>6}{'weights':>9}{'forward ms':>12}{'capture':>9}{'app':>8}{'cli':>8}"
          f"{'torchlens':>11}{'layers':>8}")
    for name in args.models:
        for size in args.sizes:
            torch.manual_seed(0)  # the same random initialisation in every run when no trained file is present
            loaded = zoo.load(name, img_size=size, device='cpu', allow_download=False)
            model, config = loaded.model, loaded.data_config

            def forward():
                with torch.inference_mode():
                    model(preprocess_batch([photo], config))

            def capture_only():
                capture.run(model, preprocess_batch([photo], config), dtype=DISPLAY_DTYPE, max_side=DISPLAY_SIDE)

            def app_call():
                inspect_images(loaded, [photo], dtype=DISPLAY_DTYPE, max_side=DISPLAY_SIDE)

            def cli_call():
                result = inspect_images(loaded, [photo], keep_maps=False)[0]
                write_csv(result.rows('photo.png'), io.StringIO(), header=False)

            calls = [forward, capture_only, app_call, cli_call]
            torchlens = _torchlens_call(model, preprocess_batch([photo], config))
            if torchlens:
                calls.append(torchlens)
            rounds = round_times(calls, args.repeats)
            times = [statistics.median(t) for t in rounds]
            ratios = [f'{t / times[0]:.2f}x' for t in times[1:]]
            if not torchlens:
                ratios.append('-')
            layers = len(capture.run(model, preprocess_batch([photo], config), keep_maps=False)[0].layers)
            print(f'{name:<44}{size:>6}{loaded.weights.label:>9}{times[0] * 1e3:>12.1f}{ratios[0]:>9}{ratios[1]:>8}'
                  f'{ratios[2]:>8}{ratios[3]:>11}{layers:>8}', flush=True)
            print('    middle half of the per-round ratios: ' + ', '.join(
                f'{label} {_middle_half(samples, rounds[0])}' for label, samples in zip(('capture', 'app', 'cli'),
                                                                                        rounds[1:])), flush=True)

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
