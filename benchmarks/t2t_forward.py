"""Time our T2T-ViT forward passes on the CPU, optionally against the paper's implementation.

    python -m benchmarks.t2t_forward [--reference PATH_TO_T2T-ViT_CLONE] [--repeats 15] [--batch-sizes 1 8]

With --reference, the paper's code is imported from the user's own clone (never copied here), given the
same weights as ours, its logits are checked against ours, and the speed ratio is printed. The two
implementations are timed alternately, round after round, so that a machine getting slower or faster
during the run affects both alike; times are medians over rounds, and the speed-up is the median of
each round's ratio.
Target: ours faster than the paper's at batch 1 and 8 (goal 1.2x), with the same outputs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import statistics
import sys

import torch

from t2t_viz.allocator import reuse_freed_memory
from t2t_viz.models import t2t_vit as ours

from .timing import round_times


def load_reference(path: str):
    sys.path.insert(0, path)
    with contextlib.redirect_stdout(io.StringIO()):  # the paper's constructors print
        return importlib.import_module('models.t2t_vit')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--reference', help="path to a local clone of the paper's code (yitu-opensource/T2T-ViT)")
    parser.add_argument('--models', nargs='+', default=['t2t_vit_24', 't2t_vit_t_24'])
    parser.add_argument('--batch-sizes', nargs='+', type=int, default=[1, 8])
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as t2t-viz's CLI and app run; the same for both implementations
    torch.manual_seed(0)

    # Build ours before importing the reference: the paper's module re-registers the same names in timm.
    models = {name: getattr(ours, name)().eval() for name in args.models}
    reference = load_reference(args.reference) if args.reference else None

    print(f'torch {torch.__version__}, {args.threads} threads, median of {args.repeats} runs')
    header = f"{'model':<14}{'batch':>6}{'ours ms':>10}"
    if reference:
        header += f"{'paper ms':>10}{'speed-up':>10}{'max |logit diff|':>18}"
    print(header)
    for name, model in models.items():
        paper_model = None
        if reference:
            with contextlib.redirect_stdout(io.StringIO()):
                paper_model = getattr(reference, name)().eval()
            paper_model.load_state_dict(model.state_dict(), strict=True)
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, 224, 224)
            timed = [model] if paper_model is None else [model, paper_model]
            with torch.inference_mode():
                times = round_times([functools.partial(m, x) for m in timed], args.repeats)
            line = f'{name:<14}{batch:>6}{statistics.median(times[0]) * 1e3:>10.1f}'
            if paper_model is not None:
                # the speed-up of each round (the two ran back to back), then the median over rounds
                speed_up = statistics.median(paper / ours for ours, paper in zip(*times))
                with torch.inference_mode():
                    diff = (model(x) - paper_model(x)).abs().max().item()
                line += f'{statistics.median(times[1]) * 1e3:>10.1f}{speed_up:>9.2f}x{diff:>18.2e}'
            print(line, flush=True)


if __name__ == '__main__':
    main()
