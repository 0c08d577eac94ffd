"""Per-channel statistics and the dead / flat / massive flags, as rows for CSV.

Flags (thresholds in :class:`Thresholds`):
    * dead: every value of the channel is zero, ``max |x| <= dead_atol`` (the paper's "zero-valued" maps);
    * flat: a constant map that is not zero, ``max x - min x <= flat_atol * max(1, max |x|)``;
    * massive: ``max |x| > massive_factor * median over the layer's channels of max |x|``
      (the paper's "too large values").
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, TextIO, Tuple

import torch

from .capture import Layer

__all__ = ['Thresholds', 'ChannelStats', 'LayerSummary', 'channel_stats', 'summarize', 'CSV_COLUMNS',
           'write_csv', 'csv_text', 'DeadChannelCounter', 'PER_CHANNEL_COLUMNS']

CSV_COLUMNS = ('image', 'model', 'weights', 'layer', 'kind', 'depth', 'height', 'width', 'tokens', 'channels',
               'dead', 'dead_fraction', 'flat', 'massive', 'dead_ids', 'massive_ids',
               'label', 'flat_fraction', 'massive_fraction', 'flat_ids')
PER_CHANNEL_COLUMNS = ('model', 'weights', 'layer', 'kind', 'depth', 'channel', 'images', 'dead_images',
                       'dead_fraction')


@dataclass(frozen=True)
class Thresholds:
    dead_atol: float = 1e-6
    flat_atol: float = 1e-6
    massive_factor: float = 100.0


@dataclass
class ChannelStats:
    max_abs: torch.Tensor  # (C,)
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    minimum: torch.Tensor  # (C,)
    maximum: torch.Tensor  # (C,)

    def flags(self, thresholds: Thresholds = Thresholds()) -> Dict[str, torch.Tensor]:
        """Boolean (C,) masks 'dead', 'flat', 'massive'."""
        dead = self.max_abs <= thresholds.dead_atol
        spread = self.maximum - self.minimum
        flat = ~dead & (spread <= thresholds.flat_atol * self.max_abs.clamp(min=1.0))
        median = self.max_abs.median()
        massive = (self.max_abs > thresholds.massive_factor * median) & ~dead
        return {'dead': dead, 'flat': flat, 'massive': massive}


def channel_stats(fmap: torch.Tensor) -> ChannelStats:
    """Statistics of a (C, H, W) map per channel, in float32 (float64 for the moments)."""
    values = fmap.reshape(fmap.shape[0], -1).to(torch.float64)  # (C, H*W)
    return ChannelStats(
        max_abs=values.abs().amax(dim=1).float(),
        mean=values.mean(dim=1).float(),
        std=values.std(dim=1, unbiased=False).float(),
        minimum=values.amin(dim=1).float(),
        maximum=values.amax(dim=1).float(),
    )


def _ids(mask: torch.Tensor) -> List[int]:
    return mask.nonzero().flatten().tolist()


@dataclass
class LayerSummary:
    name: str
    label: str
    kind: str
    depth: int
    height: int
    width: int
    channels: int
    dead_ids: List[int]
    flat_ids: List[int]
    massive_ids: List[int]
    stats: ChannelStats = field(repr=False)

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def dead(self) -> int:
        return len(self.dead_ids)

    @property
    def flat(self) -> int:
        return len(self.flat_ids)

    @property
    def massive(self) -> int:
        return len(self.massive_ids)

    def fraction(self, count: int) -> float:
        return count / self.channels if self.channels else 0.0

    def row(self, image: str, model: str, weights: str) -> Dict[str, object]:
        """One CSV row, with exactly the documented columns."""
        return {
            'image': image, 'model': model, 'weights': weights, 'layer': self.name, 'kind': self.kind,
            'depth': self.depth, 'height': self.height, 'width': self.width, 'tokens': self.tokens,
            'channels': self.channels, 'dead': self.dead, 'dead_fraction': f'{self.fraction(self.dead):.6g}',
            'flat': self.flat, 'massive': self.massive, 'dead_ids': ';'.join(map(str, self.dead_ids)),
            'massive_ids': ';'.join(map(str, self.massive_ids)), 'label': self.label,
            'flat_fraction': f'{self.fraction(self.flat):.6g}',
            'massive_fraction': f'{self.fraction(self.massive):.6g}',
            'flat_ids': ';'.join(map(str, self.flat_ids)),
        }


def summarize(layer: Layer, thresholds: Thresholds = Thresholds()) -> LayerSummary:
    stats = channel_stats(layer.fmap)
    flags = stats.flags(thresholds)
    return LayerSummary(
        name=layer.name, label=layer.label, kind=layer.kind, depth=layer.depth, height=layer.height,
        width=layer.width, channels=layer.channels, dead_ids=_ids(flags['dead']), flat_ids=_ids(flags['flat']),
        massive_ids=_ids(flags['massive']), stats=stats)


def write_csv(rows: Iterable[Dict[str, object]], out: TextIO, columns: Sequence[str] = CSV_COLUMNS,
              header: bool = True) -> None:
    writer = csv.DictWriter(out, fieldnames=list(columns), lineterminator='\n')
    if header:
        writer.writeheader()
    writer.writerows(rows)


def csv_text(rows: Iterable[Dict[str, object]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    buffer = io.StringIO()
    write_csv(rows, buffer, columns)
    return buffer.getvalue()


class DeadChannelCounter:
    """Across many images: in how many was each channel of each model x layer dead."""

    def __init__(self) -> None:
        self._counts: Dict[Tuple[str, str, str], Tuple[LayerSummary, torch.Tensor, int]] = {}

    def add(self, model: str, weights: str, summary: LayerSummary) -> None:
        key = (model, weights, summary.name)
        dead = torch.zeros(summary.channels, dtype=torch.long)
        dead[summary.dead_ids] = 1
        if key in self._counts:
            first, counts, images = self._counts[key]
            self._counts[key] = (first, counts + dead, images + 1)
        else:
            self._counts[key] = (summary, dead, 1)

    def rows(self) -> Iterable[Dict[str, object]]:
        for (model, weights, layer), (summary, counts, images) in self._counts.items():
            for channel, dead_images in enumerate(counts.tolist()):
                yield {
                    'model': model, 'weights': weights, 'layer': layer, 'kind': summary.kind,
                    'depth': summary.depth, 'channel': channel, 'images': images, 'dead_images': dead_images,
                    'dead_fraction': f'{dead_images / images:.6g}',
                }
