"""Where the statistics' time goes: each part of :func:`t2t_viz.stats.layer_stats`, per layer, on real maps.

    python -m benchmarks.statistics_profile [--model resnet50.tv_in1k] [--size 224] [--repeats 5] [--top 8]

One photo's full float32 maps are captured once; then every part of the statistics runs on every map (the
fused CPU kernels' passes, or PyTorch's reductions with T2T_VIZ_FUSED=0),
``--repeats`` times, and the medians are printed: per part in total (with the bare forward pass for scale),
and for the ``--top`` layers that cost the most. Trained weights are used when their files are present.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import numpy as np
import torch
from PIL import Image
from skimage import data

from t2t_viz import capture, kernels, stats, zoo
from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.images import preprocess_batch


def _fused_parts(fmap: torch.Tensor, reduced: kernels.FusedReduction) -> Dict[str, Callable[[], object]]:
    """The fused CPU kernels' passes (t2t_viz.kernels), each on its own; ``reduced``: the map's reduction."""
    values = fmap.reshape(fmap.shape[0], -1)  # (C, N)
    array, token_major = kernels._rows(values.numpy())  # C-contiguous (N, C) or (C, N), as reduce_map reads it
    bits = array.view(np.int32)
    channels, tokens = values.shape
    key_max, key_min = (np.empty(channels, np.int32) for _ in range(2))
    sums, squares = np.empty(channels), np.empty(tokens)
    figures = np.empty((3, channels), np.int32)
    top = np.empty(stats.TOP_K, np.float32), np.empty(stats.TOP_K, np.int64), np.empty(stats.TOP_K, np.int64)
    np.copyto(figures[2], reduced.max_abs.numpy().view(np.int32))
    threshold = float(stats._sun_bar(reduced.median_abs))
    parts = kernels._parts()  # runs of the map over threads, as reduce_map cuts it

    def one_pass() -> int:
        if token_major:
            return kernels._token_major(array, bits, key_max, key_min, sums, squares, parts)
        # without the float16 display copy, which only the app's call asks for
        return kernels._channel_major(array, bits, key_max, key_min, sums, squares, kernels._NO_COPY, parts)

    flat_bits, rank = bits.reshape(-1), (bits.size + 1) // 2
    zeros = one_pass()  # the median's passes run only when zeros are not half of the map
    return {
        'one pass: channels, norms, zeros': one_pass,
        'median |x|: bracket/histogram':
            lambda: kernels._median_bits(flat_bits, rank, zeros, parts),
        'top activations': lambda: kernels._top_magnitudes(array, bits, token_major, figures[2], *top),
        'Sun count': lambda: kernels.count_over(values, threshold),
    }


def _pytorch_parts(fmap: torch.Tensor, prefix) -> Dict[str, Callable[[], object]]:
    """PyTorch's reductions (CUDA maps, or no numba), each on its own."""
    values = fmap.reshape(fmap.shape[0], -1)  # (C, N)
    flat = stats._flat(values)  # as layer_stats sees the map's memory
    channel = stats.channel_stats(fmap)
    nonnegative = bool(channel.minimum.min() >= 0)
    median = stats._median_abs(values, nonnegative)
    threshold = stats._sun_bar(median)
    return {
        'channel min/max/mean': lambda: stats.channel_stats(fmap),
        'token norms': lambda: (values * values).sum(dim=0).sqrt(),
        'top activations': lambda: stats._top_activations(values, channel.max_abs, stats.TOP_K),
        'median |x|': lambda: stats._median_abs(values, nonnegative),
        'Sun count': lambda: stats._sun_count(flat, threshold, channel.max_abs.max()),
    }


def _parts(fmap: torch.Tensor, prefix) -> Dict[str, Callable[[], object]]:
    values = fmap.reshape(fmap.shape[0], -1)
    reduced = kernels.reduce_map(values, stats.TOP_K, (stats.SUN_MIN_MAGNITUDE, stats.SUN_MEDIAN_FACTOR))
    parts = _pytorch_parts(fmap, prefix) if reduced is None else _fused_parts(fmap, reduced)
    parts['whole layer_stats'] = lambda: stats.layer_stats(fmap, prefix)
    if prefix is not None:
        threshold = torch.tensor(stats.SUN_MIN_MAGNITUDE)
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
    print(f"{'part':<36}{'ms':>9}{'of forward':>12}")
    for part, seconds in totals.items():
        print(f'{part:<36}{seconds * 1e3:>9.2f}{seconds / forward_s:>11.1%}')
    print('costliest layers (whole layer_stats):')
    for seconds, name, shape in sorted(per_layer, reverse=True)[:args.top]:
        print(f'  {name:<28}{str(shape):<20}{seconds * 1e3:>8.2f} ms')


if __name__ == '__main__':
    main()
