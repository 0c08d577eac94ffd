"""With models loaded: a new image -> every model's first channel grid, against the bare forward passes.

    python -m benchmarks.app_latency [--models resnet50 vit_large_patch16_224 t2t_vit_24] [--repeats 3]

This is the work the app does after an upload (preprocess, capture, statistics, first grid), without
the browser round trip. Target: <= 1.5x the sum of the bare forward passes, measured in the same run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from PIL import Image
from skimage import data

from t2t_viz import zoo
from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.images import preprocess
from t2t_viz.pipeline import DISPLAY_DTYPE, DISPLAY_SIDE, inspect_images
from t2t_viz.render import channel_grid, order_channels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(zoo.DEFAULT_MODELS))
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault('T2T_VIZ_OFFLINE', '1')
    reuse_freed_memory()  # as the app does
    loaded = {name: zoo.load(name, img_size=224, device='cpu', allow_download=False) for name in args.models}
    photos = [Image.fromarray(f()) for f in (data.chelsea, data.coffee, data.astronaut, data.rocket)]
    bare, app = [], []
    for i in range(args.repeats + 1):
        image = photos[i % len(photos)]
        start = time.perf_counter()
        for model in loaded.values():
            with torch.inference_mode():
                model.model(preprocess(image, model.data_config))
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        for model in loaded.values():
            result = inspect_images(model, [image], dtype=DISPLAY_DTYPE, max_side=DISPLAY_SIDE)[0]  # as the app
            layer, summary = result.capture.layers[0], result.summaries[0]
            channel_grid(layer.fmap, summary, order_channels(summary, limit=64))
        app_s = time.perf_counter() - start
        if i:  # the first round warms up
            bare.append(forward_s)
            app.append(app_s)
    forward, total = statistics.median(bare), statistics.median(app)
    print(f'{", ".join(args.models)}: bare forwards {forward * 1e3:.0f} ms, upload to first grids '
          f'{total * 1e3:.0f} ms = {total / forward:.2f}x (target <= 1.5x)')


if __name__ == '__main__':
    main()
