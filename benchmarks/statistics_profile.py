"""Where the statistics' time goes: each part of :func:`t2t_viz.stats.layer_stats`, per layer, on real maps.

    python -m benchmarks.statistics_profile [--model resnet50.tv_in1k] [--size 224] [--repeats 5] [--top 8]

One photo's full float32 maps are captured once; then every part of the statistics runs on every map,
``--repeats`` times, and the medians are printed: per part in total (with the bare forward pass for scale),
and for the ``--top`` layers that cost the most. Trained weights are used when their files are present.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
from PIL import Image
from skimage import data

from t2t_viz import capture, stats, zoo
from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.images import preprocess_batch


def _parts(fmap: torch.Tensor, prefix) -> Dict[str, Callable[[], object]]:
    values = fmap.reshape(fmap.shape[0], -1)  # (C, N)
    flat = stats._flat(values)  # as layer_stats sees the map's memory
    channel = stats.channel_stats(fmap)
    nonnegative = bool(channel.minimum.min() >= 0)
    median = stats._median_abs(values, nonnegative)
    threshold = torch.clamp(median * stats.SUN_MEDIAN_FACTOR, min=stats.SUN_MIN_MAGNITUDE)
    parts = {
        'channel min/max/mean': lambda: stats.channel_stats(fmap),
        'token norms': lambda: (values * values).sum(dim=0).sqrt(),
        'top activations': lambda: stats._top_activations(values, channel.max_abs, stats.TOP_K),
        'median |x|': lambda: stats._median_abs(values, nonnegative),
        'Sun count': lambda: stats._sun_count(flat, threshold, channel.max_abs.max()),
        'whole layer_stats': lambda: stats.layer_stats(fmap, prefix),
    }
    if prefix is not None:
        parts['prefix tokens'] = lambda: stats._prefix_stats(prefix, threshold)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='resnet50.tv_in1k')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--top', type=int, default=8)
    args = parser.parse_args()
    reuse_freed_memory()
    torch.manual_seed(0)  # the same random initialisation in every run when no trained file is present
    loaded = zoo.load(args.model, img_size=args.size, device='cpu', allow_download=False)
    x = preprocess_batch([Image.fromarray(data.chelsea())], loaded.data_config)
    kept: List[tuple] = []  # (map, prefix tokens)

    def keep(fmap: torch.Tensor, prefix=None) -> int:
        kept.append((fmap.clone(), None if prefix is None else prefix.clone()))
        return len(kept) - 1

    layers = capture.run(loaded.model, x, keep_maps=False, reduce=keep)[0].layers
    names = {}
    for layer in layers:  # a layer that repeats the one before it (a ResNet stage) is reduced once
        names.setdefault(layer.stats, layer.name)
    names = [names[index] for index in range(len(kept))]
    with torch.inference_mode():
        loaded.model(x)
        forward = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            loaded.model(x)
            forward.append(time.perf_counter() - start)
    totals: Dict[str, float] = {}
    per_layer: List[tuple] = []
    for name, (fmap, prefix) in zip(names, kept):
        for part, call in _parts(fmap, prefix).items():
            call()
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
            seconds = statistics.median(samples)
            totals[part] = totals.get(part, 0.0) + seconds
            if part == 'whole layer_stats':
                per_layer.append((seconds, name, tuple(fmap.shape)))
    forward_s = statistics.median(forward)
    print(f'{args.model} at {args.size} ({loaded.weights.label} weights), {len(kept)} maps reduced '
          f'({sum(f.numel() for f, _ in kept) / 1e6:.1f} M values), forward {forward_s * 1e3:.1f} ms')
    print(f"{'part':<24}{'ms':>9}{'of forward':>12}")
    for part, seconds in totals.items():
        print(f'{part:<24}{seconds * 1e3:>9.2f}{seconds / forward_s:>11.1%}')
    print('costliest layers (whole layer_stats):')
    for seconds, name, shape in sorted(per_layer, reverse=True)[:args.top]:
        print(f'  {name:<28}{str(shape):<20}{seconds * 1e3:>8.2f} ms')


if __name__ == '__main__':
    main()
