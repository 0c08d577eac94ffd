"""Command line: ``t2t-viz COMMAND ...`` (or ``python -m t2t_viz COMMAND ...``)."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import torch
from PIL import Image

from . import __version__, zoo
from .allocator import batched_mmap_threshold, reuse_freed_memory
from .cachefiles import cache_dir
from .capture import REAL_FORWARD
from .figure import DEFAULT_CHANNELS, DEFAULT_SIZE, Panel, compose, figure_layers, heading_for
from .images import ImageError, find_images, load_image, preprocess
from .kernels import compile_kernels
from .memory import InsufficientMemory, available_bytes, format_bytes
from .loading import default_workers, prepared_batches, transforms_of
from .models import T2TViT
from .partial import Partial, PartialError, load_partial, merge_partials, save_partial
from .pipeline import DISPLAY_SIDE, ModelResult, display_estimate, inspect_images, layer_labels, memory_estimate
from .procedures import PAPER_NOTEBOOK, PROCEDURES, check_supported
from .render import channel_grid, norm_image, order_channels, pca_image, save_png, upscale
from .dataset import StatsRun, fitting_batch
from .examples import DEFAULT_TOP_K
from .stats import Thresholds
from .zoo import LoadedModel

__all__ = ['main', 'build_parser']


class UserError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


def _cmd_zoo(args: argparse.Namespace, out: TextIO) -> int:
    from .complexity import variant_table

    header = f"{'model':<14}{'T2T layer':<13}{'embed':>6}{'depth':>6}{'heads':>6}{'mlp':>5}" \
             f"{'params':>9}{'paper':>7}{'MACs':>8}{'paper':>7}"
    out.write(header + '\n' + '-' * len(header) + '\n')
    for row in variant_table(args.img_size):
        out.write(
            f"{row['name']:<14}{row['t2t_layer']:<13}{row['embed_dim']:>6}{row['depth']:>6}{row['num_heads']:>6}"
            f"{row['mlp_ratio']:>5g}{row['params_m']:>8.2f}M{row['paper_params_m']:>6.1f}M"
            f"{row['macs_g']:>7.2f}G{row['paper_macs_g']:>6.1f}G\n")
    out.write(f'MACs measured at {args.img_size}x{args.img_size}; params count the fixed position table and '
              'Performer features, as the paper does.\n')
    return 0


def _parse_checkpoints(items: List[str]) -> Dict[str, str]:
    checkpoints = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or not name or not path:
            raise UserError(f'--checkpoint takes MODEL=PATH, not {item!r}')
        checkpoints[name] = path
    return checkpoints


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() or args.verbose


@contextmanager
def _byte_progress(label: str, enabled: bool) -> Iterator[Callable[[int, Optional[int]], None]]:
    """A tqdm bar of bytes for a download, as a (done, total) callback."""
    from tqdm import tqdm

    bar = tqdm(desc=label, unit='B', unit_scale=True, unit_divisor=1024, disable=not enabled, leave=False)

    def update(done: int, total: Optional[int]) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        bar.close()


def _layer_bar(label: str, enabled: bool) -> Callable[[int, int], None]:
    """A tqdm bar of the layers recorded during one forward pass, as a (done, total) callback.

    The bar closes itself when the last layer is recorded.
    """
    from tqdm import tqdm

    bar = tqdm(desc=label, unit='layer', disable=not enabled, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def _model_names(args: argparse.Namespace) -> List[str]:
    return list(args.model or zoo.PRESETS[args.preset])


def _load_models(args: argparse.Namespace, names: Sequence[str]) -> Dict[str, LoadedModel]:
    checkpoints = _parse_checkpoints(args.checkpoint)
    unknown = set(checkpoints) - set(names)
    if unknown:
        raise UserError(f"--checkpoint names {sorted(unknown)}, which are not among the models {list(names)}")
    loaded = {}
    for name in names:
        try:
            with _byte_progress(f'{name} weights', _show_progress(args)) as progress:
                loaded[name] = zoo.load(name, checkpoint=checkpoints.get(name), img_size=args.img_size,
                                        device=args.device, progress=progress)
        except (zoo.WeightsError, ImageError, InsufficientMemory) as e:
            raise UserError(str(e)) from e
        sys.stderr.write(f'{name}: {loaded[name].weights.describe()}\n')
    return loaded


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(dead_atol=args.dead_atol, flat_atol=args.flat_atol, massive_factor=args.massive_factor,
                      high_norm_factor=args.high_norm_factor)


def _procedures(args: argparse.Namespace) -> List[str]:
    return list(PROCEDURES) if args.procedure == 'both' else [args.procedure]


AUTO_BATCH = 0  # --batch-size auto
MAX_AUTO_BATCH = 64


def _batch_size(text: str) -> int:
    if text == 'auto':
        return AUTO_BATCH
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError('--batch-size must be at least 1 (or auto)')
    return value


def _parse_shard(text: Optional[str]) -> Tuple[int, int]:
    if text is None:
        return 1, 1
    index, sep, count = text.partition('/')
    if not sep or not index.isdigit() or not count.isdigit() or not 1 <= int(index) <= int(count):
        raise UserError(f'--shard takes I/N with 1 <= I <= N, not {text!r}')
    return int(index), int(count)


def shard_inputs(inputs: Sequence[str], index: int, count: int) -> List[str]:
    """Shard ``index`` (1-based) of ``count``: a contiguous block of the inputs, so that shards concatenated in
    order are the inputs in order."""
    total = len(inputs)
    return list(inputs[(index - 1) * total // count:index * total // count])


def _run_options(args: argparse.Namespace, loaded: Dict[str, LoadedModel]) -> dict:
    """What must agree between a run and its resumption, or between merged shards."""
    return {'models': {name: model.weights.label for name, model in loaded.items()},
            'img_size': {name: model.img_size for name, model in loaded.items()},
            'procedures': _procedures(args), 'mlp_hidden': args.mlp_hidden,
            'thresholds': [args.dead_atol, args.flat_atol, args.massive_factor, args.high_norm_factor],
            'top_k': args.top_k if args.top_examples else 0, 'batch_size': args.batch_size}


def partial_path(output: str) -> Path:
    """The partial file kept beside a run's per-image CSV."""
    return Path(output + '.partial')


def _open_rows(args: argparse.Namespace, options: dict, inputs: List[str], shard: Tuple[int, int]):
    """(CSV file, partial to resume from or None): with --resume, the CSV cut back to the rows the partial
    counts (rows written after its last save are written again)."""
    saved = partial_path(args.output)
    if not args.resume or not saved.exists():
        if args.resume:
            sys.stderr.write(f'--resume: no {saved}; starting from the first image\n')
        return open(args.output, 'w', newline=''), None
    try:
        partial = load_partial(saved)
    except PartialError as e:
        raise UserError(str(e)) from e
    if partial.options != options or partial.inputs != inputs or partial.shard != shard:
        raise UserError(f'{saved} is of another run (other models, options or inputs); remove it to start again')
    rows = open(args.output, 'r+', newline='')
    rows.seek(0, 2)
    if rows.tell() < partial.rows_bytes:
        raise UserError(f'{args.output} is shorter than {saved} says; remove both to start again')
    rows.truncate(partial.rows_bytes)
    rows.seek(partial.rows_bytes)
    return rows, partial


def _cmd_stats_on_ray(args: argparse.Namespace, paths: List[str]) -> int:
    """The run's shards on Ray workers; the same files as one process."""
    from tqdm import tqdm

    from .stats import CSV_COLUMNS, csv_text
    try:
        from .cluster import RunSpec, run_shards
        import ray  # noqa: F401
    except ImportError as e:
        raise UserError('--ray needs Ray: pip install "t2t-viz[ray]"') from e
    if args.resume or args.shard:
        raise UserError('--ray runs every shard itself; --resume and --shard are for runs without it')
    spec = RunSpec(tuple(_model_names(args)), _parse_checkpoints(args.checkpoint), args.img_size, args.device,
                   tuple(_procedures(args)), args.mlp_hidden, _thresholds(args),
                   args.top_k if args.top_examples else 0, args.batch_size)
    partials = []
    address = None if args.ray == 'local' else args.ray
    with open(args.output, 'wb') as rows, tqdm(total=len(paths), desc='images', unit='image') as bar:
        rows.write(csv_text([], CSV_COLUMNS).encode())
        try:
            report = functools.partial(bar.write, file=sys.stderr)
            peaks: Dict[str, int] = {}
            for shard in run_shards(spec, paths, address, args.ray_workers, report=report):
                peaks[shard.worker] = max(peaks.get(shard.worker, 0), shard.peak_rss)
                rows.write(shard.rows)
                partials.append(shard.partial)
                bar.update(len(shard.partial.inputs))
                for failure in shard.partial.failures:
                    report(f'skipped: {failure.reason}')
        except Exception as e:  # a worker that died more often than Ray retries it, or a cluster error
            raise UserError(f'the Ray run failed: {type(e).__name__}: {e}') from e
    try:
        merged = merge_partials(partials)
    except PartialError as e:
        raise UserError(f'workers disagree on the weights of the models: {e}') from e
    _write_merged_files(merged, args.per_channel, args.top_examples)
    report('peak memory per worker: ' + ', '.join(format_bytes(peak) for peak in peaks.values()))
    weights = ', '.join(f'{name} {label}' for name, label in merged.options['models'].items())
    failed = len(merged.failures)
    sys.stderr.write(f'{merged.images_done} image(s) x {len(spec.models)} model(s) ({weights} weights) on Ray '
                     f'-> {args.output}' + (f'; {failed} skipped' if failed else '') + '\n')
    return 1 if failed else 0


def _cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    from tqdm import tqdm

    paths = [str(path) for path in find_images(args.paths)]
    if not paths:
        raise UserError('no image files found in ' + ', '.join(args.paths))
    if args.ray:
        return _cmd_stats_on_ray(args, paths)
    shard = _parse_shard(args.shard)
    inputs = shard_inputs(paths, *shard)
    loaded = _load_models(args, _model_names(args))
    reuse_freed_memory(batched_mmap_threshold(max(model.img_size for model in loaded.values())))
    batches = {}
    automatic = args.batch_size == AUTO_BATCH
    for name, model in loaded.items():
        for procedure in _procedures(args):
            _check_procedure(name, model, procedure)
            try:
                batch = fitting_batch(name, model.img_size, MAX_AUTO_BATCH if automatic else args.batch_size,
                                      procedure, args.mlp_hidden, device=model.device)
            except InsufficientMemory as e:
                raise UserError(f'{e}; choose a smaller --img-size') from e
            if batch < args.batch_size:
                sys.stderr.write(f'{name} at {model.img_size}x{model.img_size}: batch {args.batch_size} would not '
                                 f'fit in memory; using batches of {batch}\n')
            batches[name, procedure] = batch
    if automatic:  # the largest batch every model's pass fits in, of those the estimate traced
        args.batch_size = min(batches.values())
        sys.stderr.write(f'--batch-size auto: {args.batch_size}\n')
    show = _show_progress(args)
    options = _run_options(args, loaded)
    csv_file, resumed = _open_rows(args, options, inputs, shard)
    done = resumed.inputs_done if resumed else 0
    every = max(args.batch_size, args.save_every // args.batch_size * args.batch_size)  # whole batches
    with csv_file, tqdm(total=len(inputs), initial=done, desc='images', unit='image', disable=not show) as bar:
        run = StatsRun(loaded, csv_file, _thresholds(args), _procedures(args), args.mlp_hidden,
                       top_k=options['top_k'], header=resumed is None)
        if resumed:
            resumed.restore(run)
            sys.stderr.write(f'resuming after {done} of {len(inputs)} inputs\n')
        saved_at = done
        pin = any(model.device.type == 'cuda' for model in loaded.values())
        for batch in prepared_batches(inputs[done:], transforms_of(loaded, _procedures(args)), args.batch_size,
                                      args.workers, pin):
            for failure in batch.failures:
                run.failures.append(failure)
                sys.stderr.write(f'skipped: {failure.reason}\n')
            run.add_batch(batch.images, batches, prepared=batch.inputs,
                          progress=lambda name, procedure: _layer_bar(f'{name} {procedure}', show))
            done += batch.consumed
            bar.update(batch.consumed)
            if done - saved_at >= every:
                _save(run, csv_file, options, inputs, done, shard, args.output)
                saved_at = done
        _save(run, csv_file, options, inputs, done, shard, args.output)
    if args.per_channel:
        with open(args.per_channel, 'w', newline='') as f:
            f.write(run.per_channel_csv())
    if args.top_examples:
        with open(args.top_examples, 'w', newline='') as f:
            f.write(run.top_examples_csv())
    failed = len(run.failures)
    sys.stderr.write(f'{run.images_done} image(s) x {len(loaded)} model(s) -> {args.output}'
                     + (f' (shard {shard[0]} of {shard[1]})' if shard != (1, 1) else '')
                     + (f'; {failed} skipped' if failed else '') + '\n')
    return 1 if failed else 0


def _save(run: StatsRun, csv_file: TextIO, options: dict, inputs: List[str], done: int, shard: Tuple[int, int],
          output: str) -> None:
    """Rows on disk first, then the partial that counts them (a crash between the two repeats some rows on
    --resume, never loses them)."""
    csv_file.flush()
    os.fsync(csv_file.fileno())
    save_partial(Partial.of(run, options, inputs, done, csv_file.tell(), shard), partial_path(output))


def _write_merged_files(merged: Partial, per_channel: Optional[str], top_examples: Optional[str]) -> None:
    """The per-channel and top-examples files of merged partials (shards, or Ray's), where asked for."""
    from .stats import PER_CHANNEL_COLUMNS, csv_text

    if per_channel:
        Path(per_channel).write_text(csv_text(merged.counter.rows(), PER_CHANNEL_COLUMNS))
    if top_examples:
        Path(top_examples).write_text(merged.examples.csv_text())


def _cmd_merge(args: argparse.Namespace, out: TextIO) -> int:
    parts = []
    for given in args.partials:
        rows = given[:-len('.partial')] if given.endswith('.partial') else given
        try:
            parts.append((rows, load_partial(partial_path(rows))))
        except (PartialError, FileNotFoundError) as e:
            raise UserError(f'{given}: no readable partial beside it ({e})') from e
    parts.sort(key=lambda part: part[1].shard)
    counts = {part.shard[1] for _, part in parts}
    if len(counts) != 1 or [part.shard[0] for _, part in parts] != list(range(1, counts.pop() + 1)):
        raise UserError('the partials must be the shards 1/N ... N/N of one run, each once: got '
                        + ', '.join(f'{p.shard[0]}/{p.shard[1]}' for _, p in parts))
    unfinished = [rows for rows, part in parts if part.inputs_done < len(part.inputs)]
    if unfinished:
        raise UserError(f'not finished: {", ".join(unfinished)} (run them again with --resume)')
    try:
        merged = merge_partials([part for _, part in parts])
    except PartialError as e:
        raise UserError(str(e)) from e
    if args.top_examples and merged.examples is None:
        raise UserError('--top-examples: the shards kept no top examples (run them with --top-examples)')
    with open(args.output, 'wb') as target:
        for index, (rows, part) in enumerate(parts):
            with open(rows, 'rb') as source:
                header = source.readline()
                if index == 0:
                    target.write(header)
                target.write(source.read(part.rows_bytes - len(header)))
    _write_merged_files(merged, args.per_channel, args.top_examples)
    out.write(f'{len(parts)} shards, {merged.images_done} image(s) -> {args.output}'
              + (f'; {len(merged.failures)} skipped' if merged.failures else '') + '\n')
    return 0


def _check_procedure(name: str, loaded: LoadedModel, procedure: str) -> None:
    if procedure != REAL_FORWARD:
        try:
            check_supported(loaded.model)
        except ValueError as e:
            raise UserError(f'{name}: {e}') from e


def _load_one_image(path: str) -> Image.Image:
    try:
        return load_image(path)
    except ImageError as e:
        raise UserError(str(e)) from e


def _cmd_stages(args: argparse.Namespace, out: TextIO) -> int:
    image = _load_one_image(args.image)
    loaded = _load_models(args, [args.model])[args.model]
    if not isinstance(loaded.model, T2TViT):
        raise UserError(f'{args.model} is not a T2T-ViT model; stages exist only for t2t_vit_* models')
    x = preprocess(image, loaded.data_config).to(loaded.device)
    with torch.inference_mode():
        stages = loaded.model.forward_t2t_stages(x)
    out.write(f"{'stage':<22}{'tokens':>8}{'grid':>12}{'width':>7}\n")
    for stage in stages:
        grid = f'{stage.grid[0]}x{stage.grid[1]}'
        out.write(f'{stage.name:<22}{stage.num_tokens:>8}{grid:>12}{stage.width:>7}\n')
    splits = [s for s in stages if s.name.startswith('soft_split')]
    out.write('tokens: ' + ' -> '.join(f'{s.grid[0]}x{s.grid[1]} = {s.num_tokens}' for s in splits) + '\n')
    return 0


def _check_run_fits(loaded: LoadedModel, procedure: str, **options) -> None:
    estimate = memory_estimate(loaded.request, loaded.img_size, 1, procedure, **options)
    available = available_bytes(loaded.device)
    if estimate.peak > available:
        raise UserError(f'{loaded.request} at {loaded.img_size}x{loaded.img_size} needs about '
                        f'{format_bytes(estimate.peak)}, but only {format_bytes(available)} of memory is available')


def _single_result(args: argparse.Namespace, loaded: LoadedModel, image: Image.Image,
                   layers: Optional[Sequence[str]] = None) -> ModelResult:
    options = dict(dtype=torch.float16, max_side=args.display_side, layers=tuple(layers) if layers else None)
    try:
        _check_run_fits(loaded, args.procedure, stop_early=bool(layers), **options)
        progress = _layer_bar(f'{loaded.request} {args.procedure}', _show_progress(args))
        return inspect_images(loaded, [image], _thresholds(args), procedure=args.procedure, progress=progress,
                              stop_early=bool(layers), **options)[0]
    except ValueError as e:
        raise UserError(f'{loaded.request}: {e}') from e


def _find_layer(result: ModelResult, wanted: str):
    for layer, summary in zip(result.capture.layers, result.summaries):
        if wanted in (layer.name, layer.label, str(layer.depth)):
            return layer, summary
    names = ', '.join(layer.name for layer in result.capture.layers[:8])
    raise UserError(f'{result.model} has no layer {wanted!r} (layers are module paths such as {names}, ..., '
                    'labels such as conv25 or "block 12", or depth numbers)')


def _cmd_render(args: argparse.Namespace, out: TextIO) -> int:
    image = _load_one_image(args.image)
    loaded = _load_models(args, [args.model])[args.model]
    result = _single_result(args, loaded, image)
    layer, summary = _find_layer(result, args.layer)
    if args.mode == 'grid':
        channels = order_channels(summary, sort=args.sort, flagged_only=args.flagged_only, limit=args.channels)
        picture = channel_grid(layer.fmap, summary, channels, cmap=args.cmap)
        what = f'{len(channels)} of {layer.channels} channels'
    elif args.mode == 'pca':
        picture = upscale(pca_image(layer.fmap))
        what = 'first three principal components as RGB'
    else:
        picture = norm_image(summary.token_norms, summary.high_norm_mask())
        what = (f'token norms, {summary.high_norm_tokens} high-norm (over {summary.high_norm_factor:g}x the median '
                f'{summary.median_token_norm:.3g}) outlined')
    save_png(picture, args.output)
    out.write(f'{args.output}: {args.model} {layer.name} ({layer.label}), {what}, {summary.dead} dead, '
              f'{summary.massive} massive, weights {loaded.weights.label}, {result.procedure}\n')
    return 0


def _cmd_figure2(args: argparse.Namespace, out: TextIO) -> int:
    image = _load_one_image(args.image)
    loaded = _load_models(args, _model_names(args))
    rows = []
    for name, model in loaded.items():
        _check_procedure(name, model, args.procedure)
        try:
            labels = layer_labels(model, args.procedure)
        except ValueError as e:
            raise UserError(f'{name}: {e}') from e
        result = _single_result(args, model, image, layers=figure_layers(labels))
        rows.append([Panel(name, layer, summary, result.procedure, model.weights.label)
                     for layer, summary in zip(result.capture.layers, result.summaries)])
    picture = compose(rows, channels=args.channels, mode=args.mode, cmap=args.cmap,
                      heading=heading_for(args.image, args.img_size, args.procedure))
    save_png(picture, args.output)
    for row in rows:
        for panel in row:
            out.write(panel.title.replace('\n', ' · ') + '\n')
    out.write(f'{args.output}: Figure 2 at {args.img_size}x{args.img_size}, {args.procedure}\n')
    return 0


def _cmd_ablate(args: argparse.Namespace, out: TextIO) -> int:
    from .ablation import ABLATION_COLUMNS, ablate, ablation_rows
    from .stats import write_csv

    image = _load_one_image(args.image)
    loaded = _load_models(args, [args.model])[args.model]
    _check_procedure(args.model, loaded, args.procedure)
    _check_run_fits(loaded, args.procedure, keep_maps=False)
    try:
        result = ablate(loaded, image, args.layer, args.channels, args.mode, args.procedure, _thresholds(args))
    except ValueError as e:
        raise UserError(f'{args.model}: {e}') from e
    with open(args.output, 'w', newline='') as f:
        write_csv(ablation_rows(result), f, ABLATION_COLUMNS)
    what = f'{len(result.channels)} channel(s) of {result.label} ({result.layer}) set to {args.mode}'
    out.write(f'{args.model} ({loaded.weights.label} weights, {result.before.procedure}): {what}: '
              + (';'.join(map(str, result.channels)) or 'none chosen') + '\n')
    if result.has_logits:
        for title, top5 in (('before', result.before.top5), ('after', result.after.top5)):
            out.write(f'top-5 {title}: ' + '; '.join(f'{name} {p:.2%}' for name, p in top5) + '\n')
        out.write(f'top-1 logit change {result.top_logit_change():+.6g}, KL(before || after) '
                  f'{result.kl_divergence():.6g} nats\n')
    out.write(('no change: every ' + ('logit' if result.has_logits else 'layer statistic') + ' is exactly as before\n')
              if result.unchanged() else '')
    out.write(f'{args.output}: {len(result.layers())} layer rows from {result.label} on\n')
    return 0


def _cmd_weights(args: argparse.Namespace, out: TextIO) -> int:
    names = args.model or list(dict.fromkeys(name for preset in zoo.PRESETS.values() for name in preset))
    failed = 0
    for name in names:
        status = zoo.weights_status(name)
        if args.download and not status.trained:
            try:
                with _byte_progress(name, True) as progress:
                    status = zoo.download(name, progress)
            except zoo.WeightsError as e:
                out.write(f'{name:<44} {e}\n')
                failed += 1
                continue
        out.write(f'{name:<44} {status.describe()}\n')
    return 1 if failed else 0


def _cmd_prepare(args: argparse.Namespace, out: TextIO) -> int:
    """Do once what a server's first start would: build each model's skeleton and trace the memory estimate
    of its first run, both kept in the cache folder, and compile the statistics kernels (as pip compiles .pyc
    files when it installs)."""
    try:
        zoo.check_input_size(args.img_size)
    except ImageError as e:
        raise UserError(str(e)) from e
    failed = 0
    for name in args.model or zoo.PRESETS[zoo.DEFAULT_PRESET]:
        start = time.perf_counter()
        try:
            zoo.build_on_meta(name, args.img_size)
            display_estimate(name, args.img_size)
        except zoo.WeightsError as e:
            out.write(f'{name:<44} {e}\n')
            failed += 1
            continue
        out.write(f'{name:<44} skeleton and memory estimate at {args.img_size} ready '
                  f'({time.perf_counter() - start:.1f} s)\n')
    out.write(f'kept in {cache_dir()}\n')
    start = time.perf_counter()
    if compile_kernels():
        out.write(f'statistics kernels compiled ({time.perf_counter() - start:.1f} s), kept in numba\'s cache\n')
    return 1 if failed else 0


def _cmd_app(args: argparse.Namespace, out: TextIO) -> int:
    """Serve the app with streamlit, with the settings of the repository's .streamlit/config.toml."""
    import subprocess
    from pathlib import Path

    from .ui.app import SERVER_SETTINGS

    script = Path(__file__).resolve().parent / 'ui' / 'streamlit_app.py'
    flags = [f'--{key}={str(value).lower() if isinstance(value, bool) else value}'
             for key, value in SERVER_SETTINGS.items()]
    return subprocess.call([sys.executable, '-m', 'streamlit', 'run', str(script), *flags, *args.streamlit_args])


def _add_model_options(parser: argparse.ArgumentParser, many: bool, default_size: Optional[int] = None) -> None:
    if many:
        parser.add_argument('--model', action='append', help='repeatable; default: the trio of --preset')
        parser.add_argument('--preset', default=zoo.DEFAULT_PRESET, choices=sorted(zoo.PRESETS),
                            help="the trio's weights: 'paper' (those Figure 2 used) or 'timm' (today's defaults)")
    parser.add_argument('--checkpoint', action='append', default=[], metavar='MODEL=PATH',
                        help='weights file for a model (repeatable)')
    parser.add_argument('--img-size', type=int, default=default_size,
                        help='input size, a multiple of 16 (default: ' + (str(default_size) if default_size
                                                                           else "the model's own") + ')')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--mlp-hidden', action='store_true', help="also capture each block's MLP hidden activation")
    parser.add_argument('--dead-atol', type=float, default=Thresholds.dead_atol)
    parser.add_argument('--flat-atol', type=float, default=Thresholds.flat_atol)
    parser.add_argument('--massive-factor', type=float, default=Thresholds.massive_factor)
    parser.add_argument('--high-norm-factor', type=float, default=Thresholds.high_norm_factor,
                        help='a token is high-norm over this many times the median token norm of its layer')


def _add_procedure_option(parser: argparse.ArgumentParser, both: bool) -> None:
    choices = PROCEDURES + (('both',) if both else ())
    parser.add_argument('--procedure', default=REAL_FORWARD, choices=choices,
                        help=f"{REAL_FORWARD}: the model's forward pass; {PAPER_NOTEBOOK}: as the paper's notebooks "
                             'computed their figures (our analogue for T2T-ViT)'
                             + ('; both: one row each' if both else ''))


def _add_picture_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--cmap', default='viridis', choices=('viridis', 'gray'))
    parser.add_argument('--display-side', type=int, default=DISPLAY_SIDE * 2,
                        help='maps larger than this are average-pooled for the picture (statistics use full maps)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='t2t-viz', description=__doc__)
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true', help='log progress and loading details')
    commands = parser.add_subparsers(dest='command', required=True)

    zoo_parser = commands.add_parser('zoo', help='T2T-ViT variants: measured params and MACs next to the paper')
    zoo_parser.add_argument('--img-size', type=int, default=224)
    zoo_parser.set_defaults(run=_cmd_zoo)

    stats = commands.add_parser('stats', help='dead/flat/massive channel and token-norm statistics as CSV')
    stats.add_argument('paths', nargs='+', help='image files or folders (searched recursively)')
    _add_model_options(stats, many=True)
    _add_procedure_option(stats, both=True)
    stats.add_argument('--batch-size', type=_batch_size, default=8,
                       help=f'images per forward pass (shrunk to fit memory), or auto: the largest batch up to '
                            f'{MAX_AUTO_BATCH} that the memory estimate says fits (the GPU\'s free memory on CUDA)')
    stats.add_argument('-o', '--output', required=True, help='CSV file, one row per image x model x layer')
    stats.add_argument('--per-channel', metavar='CSV', help='also write, per model x layer x channel, the '
                       'fraction of images in which the channel is dead')
    stats.add_argument('--top-examples', metavar='CSV', help='also write, per model x layer x channel, the images '
                       "in which the channel's maximum activation was largest, with the value and its grid position")
    stats.add_argument('--top-k', type=int, default=DEFAULT_TOP_K, help='images kept per channel for --top-examples '
                       f'(default {DEFAULT_TOP_K})')
    stats.add_argument('--shard', metavar='I/N', help='process only shard I of N (a contiguous block of the '
                       'inputs, in order) and keep its partial for `t2t-viz merge`')
    stats.add_argument('--resume', action='store_true', help='continue an interrupted run of the same command from '
                       'its partial file (OUTPUT.partial)')
    stats.add_argument('--ray', nargs='?', const='local', metavar='ADDRESS',
                       help='run the shards on Ray workers: a new local cluster, or the cluster at ADDRESS '
                            '("auto": the one this machine belongs to); needs pip install "t2t-viz[ray]"')
    stats.add_argument('--ray-workers', type=int, metavar='N',
                       help='Ray workers (default: one per GPU of the cluster, else one per CPU)')
    stats.add_argument('--workers', type=int, default=default_workers(), metavar='N',
                       help='processes that decode and resize images while the models run (default: one per core '
                            f'but one, here {default_workers()}; 0 decodes in this process)')
    stats.add_argument('--save-every', type=int, default=64, metavar='N',
                       help='save the partial statistics every N images (default 64)')
    stats.set_defaults(run=_cmd_stats)

    merge = commands.add_parser('merge', help='combine the shards of a stats run into the files of one run')
    merge.add_argument('partials', nargs='+', help="the shards' per-image CSV files (each with its .partial beside)")
    merge.add_argument('-o', '--output', required=True, help='the per-image CSV of all shards, in input order')
    merge.add_argument('--per-channel', metavar='CSV')
    merge.add_argument('--top-examples', metavar='CSV')
    merge.set_defaults(run=_cmd_merge)

    stages = commands.add_parser('stages', help='the Tokens-to-Token stage table of an image')
    stages.add_argument('image')
    stages.add_argument('--model', default='t2t_vit_24')
    _add_model_options(stages, many=False)
    stages.set_defaults(run=_cmd_stages)

    render = commands.add_parser('render', help="one layer as a PNG: channel grid, PCA colour map or token norms")
    render.add_argument('image')
    render.add_argument('--model', required=True)
    render.add_argument('--layer', required=True, help='module path, label (conv25, "block 12") or depth')
    render.add_argument('--mode', default='grid', choices=('grid', 'pca', 'norm'))
    render.add_argument('--channels', type=int, help='show at most this many channels')
    render.add_argument('--sort', default='index', choices=('index', 'max', 'mean'))
    render.add_argument('--flagged-only', action='store_true')
    render.add_argument('-o', '--output', required=True)
    _add_model_options(render, many=False)
    _add_procedure_option(render, both=False)
    _add_picture_options(render)
    render.set_defaults(run=_cmd_render)

    figure2 = commands.add_parser('figure2', help="the paper's Figure 2 layout on an image, as one PNG")
    figure2.add_argument('image')
    figure2.add_argument('-o', '--output', required=True)
    figure2.add_argument('--mode', default='grid', choices=('grid', 'pca'))
    figure2.add_argument('--channels', type=int, default=DEFAULT_CHANNELS, help='channels per panel')
    _add_model_options(figure2, many=True, default_size=DEFAULT_SIZE)
    _add_procedure_option(figure2, both=False)
    _add_picture_options(figure2)
    figure2.set_defaults(run=_cmd_figure2, cmap='gray')

    ablate = commands.add_parser('ablate', help="zero channels of a layer (or set them to their mean) and compare "
                                 'predictions and later layers with the untouched pass')
    ablate.add_argument('image')
    ablate.add_argument('--model', required=True)
    ablate.add_argument('--layer', required=True, help='module path, label (conv25, "block 12") or depth')
    ablate.add_argument('--channels', required=True,
                        help="dead, flat, massive (as flagged in the untouched pass), top:N (largest mean "
                             "activation) or a list such as 3,17,42")
    ablate.add_argument('--mode', default='zero', choices=('zero', 'mean'),
                        help="zero, or each channel's mean over the image")
    ablate.add_argument('-o', '--output', required=True, help='CSV: one row per later layer, then the predictions')
    _add_model_options(ablate, many=False)
    _add_procedure_option(ablate, both=False)
    ablate.set_defaults(run=_cmd_ablate)

    prepare = commands.add_parser('prepare', help="do once what the app's first start would: build the models "
                                  'and trace their memory estimates, kept for every later process')
    prepare.add_argument('--model', action='append', help="repeatable; default: the app's first models (the paper's "
                         'trio)')
    prepare.add_argument('--img-size', type=int, default=224, help="the app's input size (default 224)")
    prepare.set_defaults(run=_cmd_prepare)

    app = commands.add_parser('app', help='serve the app (streamlit) on http://localhost:8501')
    app.add_argument('streamlit_args', nargs=argparse.REMAINDER,
                     help='passed to streamlit run, e.g. --server.port 8600')
    app.set_defaults(run=_cmd_app)

    weights = commands.add_parser('weights', help="where each model's weights come from now")
    weights.add_argument('--model', action='append', help='default: the models of every preset')
    weights.add_argument('--download', action='store_true', help='fetch missing weights (needs the network)')
    weights.set_defaults(run=_cmd_weights)
    return parser


def main(argv: Optional[List[str]] = None, out: Optional[TextIO] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'top_k', 1) < 1:
        parser.error('--top-k must be at least 1')
    if getattr(args, 'save_every', 1) < 1:
        parser.error('--save-every must be at least 1')
    if getattr(args, 'workers', 0) < 0:
        parser.error('--workers cannot be negative')
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(message)s')
    reuse_freed_memory()
    try:
        return args.run(args, out or sys.stdout)
    except UserError as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
