"""Command line: ``python -m t2t_viz COMMAND ...``."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional, TextIO

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='python -m t2t_viz', description=__doc__)
    parser.add_argument('-v', '--verbose', action='store_true', help='log progress and loading details')
    commands = parser.add_subparsers(dest='command', required=True)

    zoo = commands.add_parser('zoo', help='T2T-ViT variants: measured params and MACs next to the paper')
    zoo.add_argument('--img-size', type=int, default=224)
    zoo.set_defaults(run=_cmd_zoo)
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(message)s')
    try:
        return args.run(args, out)
    except UserError as e:
        sys.stderr.write(f'error: {e}\n')
        return 2
