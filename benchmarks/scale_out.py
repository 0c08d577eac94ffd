"""ImageNet-scale statistics, scaled out: images/s of one process, of two --shard processes merged, and of
--ray with two workers, against bare batched forward passes of the same models; peak memory per worker.

    python -m benchmarks.scale_out [--images 2000] [--models resnet50.tv_in1k ...] [--batch-size 8]
                                   [--ways process shard ray] [--rounds 1]

The folder comes from :mod:`benchmarks.imagenet_like`. Rates leave out process start and model loading:
each way's time on the folder minus its time on one image. Two shard processes each get half the cores
(``OMP_NUM_THREADS``), as two Ray workers do. Goal for one process: within 10% of the bare forwards.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

from t2t_viz import zoo
from t2t_viz.images import preprocess_batch

from .imagenet_like import write_folder

_ENV = {**os.environ, 'T2T_VIZ_OFFLINE': '1'}


_PEAK_LINE = 'scale_out: peak RSS bytes '
# The stats process reports its own peak at exit: VmHWM belongs to the program after exec, whereas ru_maxrss
# (wait4, RUSAGE_CHILDREN) also keeps the resident size of the parent it was forked from.
_REPORT_PEAK = f'''import atexit, sys
def _report_peak():
    with open('/proc/self/status') as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith('VmHWM:'))
    sys.stderr.write('\\n{_PEAK_LINE}%d\\n' % (kib * 1024))
atexit.register(_report_peak)
'''
_RUN_CLI = 'from t2t_viz.cli import main\nsys.exit(main(sys.argv[1:]))\n'


def _stats(arguments, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', _REPORT_PEAK + _RUN_CLI, 'stats', *arguments], env=env or _ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _timed(arguments_list, env=None) -> tuple:
    """Seconds for processes started together to finish, their stderr, and the largest peak RSS among them."""
    start = time.perf_counter()
    processes = [_stats(arguments, env) for arguments in arguments_list]
    with ThreadPoolExecutor(len(processes)) as pool:  # read every stderr at once, so that no pipe fills up
        errors = list(pool.map(lambda process: process.stderr.read(), processes))
    for process, error in zip(processes, errors):
        process.stderr.close()
        if process.wait():
            raise SystemExit(f'{" ".join(map(str, process.args[3:]))} failed ({process.returncode}):\n{error[-2000:]}')
    elapsed = time.perf_counter() - start
    peaks = [int(line[len(_PEAK_LINE):]) for error in errors for line in error.splitlines()
             if line.startswith(_PEAK_LINE)]
    return elapsed, errors, max(peaks)


def _bare_rate(models, paths, batch_size: int) -> float:
    """Images/s of the models' plain forward passes over already-preprocessed batches."""
    images = [Image.open(path).convert('RGB') for path in paths]
    total = 0.0
    for name in models:
        loaded = zoo.load(name, img_size=224, device='cpu', allow_download=False)
        batches = [preprocess_batch(images[i:i + batch_size], loaded.data_config)
                   for i in range(0, len(images), batch_size)]
        with torch.inference_mode():
            loaded.model(batches[0])
            start = time.perf_counter()
            for x in batches:
                loaded.model(x)
            total += time.perf_counter() - start
    return len(images) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=2000)
    parser.add_argument('--models', nargs='+', default=list(zoo.PRESETS['paper']))
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--ways', nargs='+', choices=['process', 'shard', 'ray'], default=['process', 'shard', 'ray'],
                        help='which ways to time (default: all three)')
    parser.add_argument('--rounds', type=int, default=1, help='time every way this many times, alternately')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        paths = write_folder(folder / 'images', args.images)
        one_image = folder / 'one'
        one_image.mkdir()
        (one_image / paths[0].name).write_bytes(paths[0].read_bytes())
        common = ['--img-size', '224', '--batch-size', str(args.batch_size)]
        for model in args.models:
            common += ['--model', model]
        half = {**_ENV, 'OMP_NUM_THREADS': str(max(1, (os.cpu_count() or 2) // 2))}
        ways = {
            'process': ('1 process', lambda images, out: _timed([[images, '-o', f'{out}.csv', *common]])),
            'shard': ('--shard x2, merged', lambda images, out: _merged(images, out, common, half)),
            'ray': ('--ray, 2 workers', lambda images, out: _timed([[images, '-o', f'{out}.csv', *common, '--ray',
                                                                     '--ray-workers', '2']])),
        }
        print(f'{len(paths)} JPEGs, {", ".join(args.models)} at 224, batch {args.batch_size}, '
              f'{os.cpu_count()} cores; each way against the bare forwards timed just before and just after it')
        bare_sample = paths[:64]  # the bare forwards' images, timed before the first way and after each
        bare = _bare_rate(args.models, bare_sample, args.batch_size)
        ratios = {key: [] for key in args.ways}
        for round_index in range(args.rounds):
            for key in args.ways:
                way, run = ways[key]
                startup, _, _ = run(str(one_image), str(folder / 'warm'))
                elapsed, errors, peak = run(str(folder / 'images'), str(folder / 'out'))
                rate = (len(paths) - 1) / (elapsed - startup)
                bare_before, bare = bare, _bare_rate(args.models, bare_sample, args.batch_size)
                reference = (bare_before + bare) / 2
                ratios[key].append(rate / reference)
                lines = [line for error in errors for line in error.splitlines() if 'peak memory per worker' in line]
                memory = lines[0].split(': ', 1)[1] if lines else f'{peak / 2**30:.2f} GiB (largest process)'
                print(f'round {round_index + 1}: {way:<20}{rate:>7.3f} images/s, bare {bare_before:.3f}-{bare:.3f}: '
                      f'{rate / reference:.2f}x the bare forwards; peak memory per worker {memory}', flush=True)
        if args.rounds > 1:
            for key in args.ways:
                print(f'{ways[key][0]:<20} median {statistics.median(ratios[key]):.2f}x the bare forwards '
                      f'({", ".join(f"{r:.2f}" for r in ratios[key])})')


def _merged(images: str, out: str, common, env) -> tuple:
    elapsed, errors, peak = _timed([[images, '-o', f'{out}{i}.csv', *common, '--shard', f'{i}/2'] for i in (1, 2)],
                                   env)
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 't2t_viz', 'merge', f'{out}1.csv', f'{out}2.csv', '-o', f'{out}.csv'],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return elapsed + time.perf_counter() - start, errors, peak


if __name__ == '__main__':
    main()
