"""Command line: ``python -m t2t_viz COMMAND ...``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Dict, List, Optional, Sequence, TextIO

import torch
from PIL import Image

from . import zoo
from .allocator import reuse_freed_memory
from .images import ImageError, find_images, load_image, preprocess
from .models import T2TViT
from .pipeline import ModelResult, inspect_images
from .render import channel_grid, order_channels, save_png
from .stats import PER_CHANNEL_COLUMNS, DeadChannelCounter, Thresholds, write_csv
from .zoo import LoadedModel

__all__ = ['main']


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


def _load_models(args: argparse.Namespace, names: Sequence[str]) -> Dict[str, LoadedModel]:
    checkpoints = _parse_checkpoints(args.checkpoint)
    unknown = set(checkpoints) - set(names)
    if unknown:
        raise UserError(f"--checkpoint names {sorted(unknown)}, which are not among the models {list(names)}")
    loaded = {}
    for name in names:
        try:
            loaded[name] = zoo.load(name, checkpoint=checkpoints.get(name), img_size=args.img_size,
                                    device=args.device)
        except (zoo.WeightsError, ImageError) as e:
            raise UserError(str(e)) from e
        sys.stderr.write(f'{name}: {loaded[name].weights.describe()}\n')
    return loaded


def _thresholds(args: argparse.Namespace) -> Thresholds:
    return Thresholds(dead_atol=args.dead_atol, flat_atol=args.flat_atol, massive_factor=args.massive_factor)


def _cmd_stats(args: argparse.Namespace, out: TextIO) -> int:
    from tqdm import tqdm

    paths = list(find_images(args.paths))
    if not paths:
        raise UserError('no image files found in ' + ', '.join(args.paths))
    loaded = _load_models(args, args.model or list(zoo.DEFAULT_MODELS))
    counter = DeadChannelCounter() if args.per_channel else None
    thresholds = _thresholds(args)
    failed = 0
    with open(args.output, 'w', newline='') as csv_file:
        write_csv([], csv_file)
        for start in tqdm(range(0, len(paths), args.batch_size), desc='images', unit='batch',
                          disable=not sys.stderr.isatty() and not args.verbose):
            batch_paths, images = [], []
            for path in paths[start:start + args.batch_size]:
                try:
                    images.append(load_image(path))
                    batch_paths.append(str(path))
                except ImageError as e:
                    failed += 1
                    sys.stderr.write(f'skipped: {e}\n')
            if not images:
                continue
            for name, model in loaded.items():
                for path, result in zip(batch_paths, inspect_images(
                        model, images, thresholds, mlp_hidden=args.mlp_hidden)):
                    write_csv(result.rows(path), csv_file, header=False)
                    if counter:
                        for summary in result.summaries:
                            counter.add(name, result.weights.label, summary)
    if counter:
        with open(args.per_channel, 'w', newline='') as f:
            write_csv(counter.rows(), f, PER_CHANNEL_COLUMNS)
    done = len(paths) - failed
    sys.stderr.write(f'{done} image(s) x {len(loaded)} model(s) -> {args.output}'
                     + (f'; {failed} skipped' if failed else '') + '\n')
    return 1 if failed else 0


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
    result = inspect_images(loaded, [image], _thresholds(args), mlp_hidden=args.mlp_hidden)[0]
    layer, summary = _find_layer(result, args.layer)
    channels = order_channels(summary, sort=args.sort, flagged_only=args.flagged_only, limit=args.channels)
    save_png(channel_grid(layer.fmap, summary, channels), args.output)
    out.write(f'{args.output}: {args.model} {layer.name} ({layer.label}), {len(channels)} of {layer.channels} '
              f'channels, {summary.dead} dead, {summary.massive} massive, weights {loaded.weights.label}\n')
    return 0


def _cmd_weights(args: argparse.Namespace, out: TextIO) -> int:
    for name in args.model or zoo.DEFAULT_MODELS:
        status = zoo.weights_status(name)
        if args.download and not status.trained:
            try:
                status = zoo.download(name)
            except zoo.WeightsError as e:
                out.write(f'{name:<24} {e}\n')
                continue
        out.write(f'{name:<24} {status.describe()}\n')
    return 0


def _add_model_options(parser: argparse.ArgumentParser, many: bool) -> None:
    if many:
        parser.add_argument('--model', action='append', help='repeatable; default: the trio '
                            + ', '.join(zoo.DEFAULT_MODELS))
    parser.add_argument('--checkpoint', action='append', default=[], metavar='MODEL=PATH',
                        help='weights file for a model (repeatable)')
    parser.add_argument('--img-size', type=int, help='input size, a multiple of 16 (default: the model\'s own)')
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--mlp-hidden', action='store_true', help="also capture each block's MLP hidden activation")
    parser.add_argument('--dead-atol', type=float, default=Thresholds.dead_atol)
    parser.add_argument('--flat-atol', type=float, default=Thresholds.flat_atol)
    parser.add_argument('--massive-factor', type=float, default=Thresholds.massive_factor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m t2t_viz', description=__doc__)
    parser.add_argument('-v', '--verbose', action='store_true', help='log progress and loading details')
    commands = parser.add_subparsers(dest='command', required=True)

    zoo = commands.add_parser('zoo', help='T2T-ViT variants: measured params and MACs next to the paper')
    zoo.add_argument('--img-size', type=int, default=224)
    zoo.set_defaults(run=_cmd_zoo)

    stats = commands.add_parser('stats', help='dead/flat/massive channel statistics of images as CSV')
    stats.add_argument('paths', nargs='+', help='image files or folders (searched recursively)')
    _add_model_options(stats, many=True)
    stats.add_argument('--batch-size', type=int, default=8)
    stats.add_argument('-o', '--output', required=True, help='CSV file, one row per image x model x layer')
    stats.add_argument('--per-channel', metavar='CSV', help='also write, per model x layer x channel, the '
                       'fraction of images in which the channel is dead')
    stats.set_defaults(run=_cmd_stats)

    stages = commands.add_parser('stages', help='the Tokens-to-Token stage table of an image')
    stages.add_argument('image')
    stages.add_argument('--model', default='t2t_vit_24')
    _add_model_options(stages, many=False)
    stages.set_defaults(run=_cmd_stages)

    render = commands.add_parser('render', help="one layer's channel grid as a PNG, flagged channels outlined")
    render.add_argument('image')
    render.add_argument('--model', required=True)
    render.add_argument('--layer', required=True, help='module path, label (conv25, "block 12") or depth')
    render.add_argument('--channels', type=int, help='show at most this many channels')
    render.add_argument('--sort', default='index', choices=('index', 'max', 'mean'))
    render.add_argument('--flagged-only', action='store_true')
    render.add_argument('-o', '--output', required=True)
    _add_model_options(render, many=False)
    render.set_defaults(run=_cmd_render)

    weights = commands.add_parser('weights', help='where each default model\'s weights come from now')
    weights.add_argument('--model', action='append')
    weights.add_argument('--download', action='store_true', help='fetch missing weights (needs the network)')
    weights.set_defaults(run=_cmd_weights)
    return parser


def main(argv: Optional[List[str]] = None, out: Optional[TextIO] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, 'batch_size', 1) < 1:
        parser.error('--batch-size must be at least 1')
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(message)s')
    reuse_freed_memory()
    try:
        return args.run(args, out or sys.stdout)
    except UserError as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
