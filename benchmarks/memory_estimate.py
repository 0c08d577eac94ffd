"""Memory estimates against measured peak RSS, and the time of one image, per model and input size.

    python -m benchmarks.memory_estimate [--models resnet50.tv_in1k ...] [--sizes 224 1024 2048]
                                         [--modes app stats rollout]

Every (model, size, mode) runs in a fresh process: it measures its RSS after the imports (the baseline),
loads the model, runs one image the way the app (``app``: float16 display maps of at most 128 pixels a
side, statistics from full maps) or the CLI's ``stats`` (``stats``: statistics only) do, and reports
its peak RSS (``ru_maxrss``) and the time of the pass. ``rollout`` (not run by default) is the Attention
tab's rollout of the class token through all blocks of a ViT or T2T-ViT instead. The estimate is
t2t-viz's own: baseline + weights + the peak of the pass measured shape-only on the meta device
(:func:`t2t_viz.pipeline.memory_estimate`, :func:`t2t_viz.pipeline.rollout_estimate`). Goal: within
+-30% of the measured peak RSS.
Random weights are used when no trained file is present; weights do not change memory or time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from t2t_viz.zoo import PRESETS

_CHILD = r'''
import json, resource, sys, time
import torch
from PIL import Image
from skimage import data
import t2t_viz
from t2t_viz import zoo
from t2t_viz.allocator import MMAP_THRESHOLD_BYTES, batched_mmap_threshold, reuse_freed_memory
from t2t_viz.attention import attention_rollout
from t2t_viz.images import preprocess
from t2t_viz.pipeline import inspect_images, memory_estimate, rollout_estimate

def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096

name, size, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
reuse_freed_memory(batched_mmap_threshold(size) if mode == 'stats' else MMAP_THRESHOLD_BYTES)  # as the CLI, the app
options = dict(dtype=torch.float16, max_side=128) if mode == 'app' else dict(keep_maps=False)
image = Image.fromarray(data.astronaut())
baseline = rss()
estimate = rollout_estimate(name, size, -1) if mode == 'rollout' else memory_estimate(name, size, 1, **options)
loaded = zoo.load(name, img_size=size, device='cpu', allow_download=False)
start = time.perf_counter()
if mode == 'rollout':
    result = attention_rollout(loaded.model, preprocess(image, loaded.data_config))
else:
    result = inspect_images(loaded, [image], **options)[0]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(baseline=baseline, weights=estimate.weights, pass_peak=estimate.peak, kept=estimate.kept,
                      measured=peak, seconds=seconds, weights_source=loaded.weights.source)))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=list(PRESETS['paper']))
    parser.add_argument('--sizes', nargs='+', type=int, default=[224, 1024, 2048])
    parser.add_argument('--modes', nargs='+', default=['app', 'stats'], choices=('app', 'stats', 'rollout'))
    args = parser.parse_args()
    env = {**os.environ, 'T2T_VIZ_OFFLINE': os.environ.get('T2T_VIZ_OFFLINE', '1')}
    print(f"{'model':<42}{'size':>6}{'mode':>8}{'baseline':>10}{'weights':>9}{'pass':>9}{'estimate':>10}"
          f"{'measured':>10}{'error':>8}{'seconds':>9}")
    for name in args.models:
        for size in args.sizes:
            for mode in args.modes:
                child = subprocess.run([sys.executable, '-c', _CHILD, name, str(size), mode], capture_output=True,
                                       text=True, env=env)
                if child.returncode:
                    print(f'{name:<42}{size:>6}{mode:>8}  failed: {child.stderr.strip().splitlines()[-1]}', flush=True)
                    continue
                r = json.loads(child.stdout.strip().splitlines()[-1])
                estimate = r['baseline'] + r['weights'] + r['pass_peak']
                gib = 2 ** 30
                print(f"{name:<42}{size:>6}{mode:>8}{r['baseline'] / gib:>9.2f}G{r['weights'] / gib:>8.2f}G"
                      f"{r['pass_peak'] / gib:>8.2f}G{estimate / gib:>9.2f}G{r['measured'] / gib:>9.2f}G"
                      f"{(estimate / r['measured'] - 1) * 100:>7.1f}%{r['seconds']:>9.1f}", flush=True)


if __name__ == '__main__':
    main()
