"""Per-layer statistics of feature maps: channel flags, token norms, massive activations; rows for CSV.

Channel flags (thresholds in :class:`Thresholds`):
    * dead: every value of the channel is zero, ``max |x| <= dead_atol`` (the paper's "zero-valued" maps);
    * flat: a constant map that is not zero, ``max x - min x <= flat_atol * max(1, max |x|)``;
    * massive: ``max |x| > massive_factor * median over the layer's channels of max |x|``
      (the paper's "too large values").

Token norms and massive activations (per layer):
    * token norm: the L2 norm over channels at each position (each token of a ViT, each pixel of a CNN map);
      a token is *high-norm* when its norm is over ``high_norm_factor`` x the layer's median token norm
      (Darcet et al. 2024, "Vision Transformers Need Registers", see outliers near 10x in large ViTs);
    * top activations: the ``TOP_K`` largest |x| of the layer with their channel and position, and the
      ratio of the largest to the layer's median |x|;
    * Sun et al. 2024 ("Massive Activations in Large Language Models") call an activation massive when
      |x| > 100 and about 1000x the layer's median |x|; ``sun_massive`` counts the activations with
      |x| > max(100, 1000 x median |x|).

Every figure is reduced from the full-resolution map where it is produced (:func:`layer_stats`, called
inside the capture hook), so statistics stay exact when only a small display copy of the map is kept.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Sequence, TextIO, Tuple

import torch

from .capture import REAL_FORWARD, Layer

__all__ = ['Thresholds', 'ChannelStats', 'LayerStats', 'LayerSummary', 'TopActivation', 'channel_stats',
           'layer_stats', 'summarize', 'CSV_COLUMNS', 'write_csv', 'csv_text', 'DeadChannelCounter', 'ChannelCounts',
           'PER_CHANNEL_COLUMNS', 'TOP_K', 'SUN_MIN_MAGNITUDE', 'SUN_MEDIAN_FACTOR']

CSV_COLUMNS = ('image', 'model', 'weights', 'layer', 'kind', 'depth', 'height', 'width', 'tokens', 'channels',
               'dead', 'dead_fraction', 'flat', 'massive', 'dead_ids', 'massive_ids',
               'label', 'flat_fraction', 'massive_fraction', 'flat_ids',
               'procedure', 'max_abs', 'max_abs_channel', 'max_abs_row', 'max_abs_col', 'median_abs',
               'max_abs_ratio', 'sun_massive', 'median_token_norm', 'max_token_norm', 'high_norm_tokens',
               'high_norm_fraction')
PER_CHANNEL_COLUMNS = ('model', 'weights', 'layer', 'kind', 'depth', 'channel', 'images', 'dead_images',
                       'dead_fraction', 'procedure')

TOP_K = 5  # top activations kept per layer and image
MEDIAN_SAMPLE = 65_536  # median |x| is exact up to this many values, else taken over an even-stride sample
SUN_MIN_MAGNITUDE = 100.0
SUN_MEDIAN_FACTOR = 1000.0


@dataclass(frozen=True)
class Thresholds:
    dead_atol: float = 1e-6
    flat_atol: float = 1e-6
    massive_factor: float = 100.0
    high_norm_factor: float = 4.0


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
    """Statistics of a (C, H, W) map per channel, in float32.

    Every reduction reads the map in place: a ``dtype=float64`` reduction would make a hidden float64 copy
    of the whole map, which memory estimates cannot see (min/max are exact; mean and std come from
    PyTorch's float32 Welford reduction).
    """
    values = fmap.reshape(fmap.shape[0], -1).float()  # (C, H*W); a view when fmap is float32
    minimum, maximum = torch.aminmax(values, dim=1)
    std, mean = torch.std_mean(values, dim=1, correction=0)
    return ChannelStats(max_abs=torch.maximum(maximum, -minimum), mean=mean, std=std, minimum=minimum,
                        maximum=maximum)


@dataclass
class LayerStats:
    """What the statistics need of one full (C, H, W) map, reduced where the map was produced."""
    channels: ChannelStats
    token_norms: torch.Tensor  # (H, W) L2 norm over channels at each position
    top_values: torch.Tensor  # (k,) the k largest |x| of the layer (signed values), largest first
    top_channels: torch.Tensor  # (k,) their channels
    top_positions: torch.Tensor  # (k,) their positions, row * W + col
    median_abs: torch.Tensor  # () median |x| of the layer (see MEDIAN_SAMPLE)
    sun_massive: torch.Tensor  # () activations with |x| > max(100, 1000 x median |x|)


def _median_abs(values: torch.Tensor) -> torch.Tensor:
    flat = values.reshape(-1)
    if flat.numel() > MEDIAN_SAMPLE:
        flat = flat[::math.ceil(flat.numel() / MEDIAN_SAMPLE)]  # (<= MEDIAN_SAMPLE,) even stride
    return flat.abs().median()


def _top_activations(values: torch.Tensor, max_abs: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """The k largest |x| of (C, N) values: they all lie in the k channels with the largest max |x|."""
    k = min(k, values.numel())
    channels = max_abs.topk(min(k, max_abs.numel())).indices  # (k,)
    rows = values[channels]  # (k, N)
    _, flat_index = rows.abs().reshape(-1).topk(k)  # (k,)
    row, position = flat_index // rows.shape[1], flat_index % rows.shape[1]
    return rows[row, position], channels[row], position


def layer_stats(fmap: torch.Tensor, top_k: int = TOP_K) -> LayerStats:
    """Reduce one full (C, H, W) map; tensor operations only, so it also runs shape-only on the meta device."""
    channels = channel_stats(fmap)
    values = fmap.reshape(fmap.shape[0], -1).float()  # (C, N)
    token_norms = torch.linalg.vector_norm(fmap.float(), dim=0)  # (H, W)
    top_values, top_channels, top_positions = _top_activations(values, channels.max_abs, top_k)
    median_abs = _median_abs(values)
    threshold = torch.clamp(median_abs * SUN_MEDIAN_FACTOR, min=SUN_MIN_MAGNITUDE)
    if values.is_meta or float(top_values.abs().max()) > float(threshold):
        sun_massive = (values > threshold).sum() + (values < -threshold).sum()
    else:
        sun_massive = torch.zeros((), dtype=torch.long)  # the largest |x| is under the bar: nothing to count
    return LayerStats(channels, token_norms, top_values, top_channels, top_positions, median_abs, sun_massive)


@dataclass(frozen=True)
class TopActivation:
    value: float
    channel: int
    row: int
    col: int


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
    token_norms: torch.Tensor = field(repr=False)  # (H, W)
    top: List[TopActivation] = field(default_factory=list)  # largest |x| first
    median_abs: float = 0.0
    sun_massive: int = 0
    median_token_norm: float = 0.0
    max_token_norm: float = 0.0
    high_norm_tokens: int = 0
    high_norm_factor: float = Thresholds.high_norm_factor

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

    @property
    def max_abs_ratio(self) -> float:
        """Largest |x| over the layer's median |x| (inf when the median is 0)."""
        largest = abs(self.top[0].value) if self.top else 0.0
        return largest / self.median_abs if self.median_abs > 0 else (math.inf if largest > 0 else 0.0)

    def high_norm_mask(self) -> torch.Tensor:
        """(H, W) True where the token norm is over ``high_norm_factor`` x the median token norm."""
        return self.token_norms > self.high_norm_factor * self.median_token_norm

    def fraction(self, count: int) -> float:
        return count / self.channels if self.channels else 0.0

    def row(self, image: str, model: str, weights: str, procedure: str = REAL_FORWARD) -> Dict[str, object]:
        """One CSV row, with exactly the documented columns."""
        top = self.top[0] if self.top else TopActivation(0.0, -1, -1, -1)
        return {
            'image': image, 'model': model, 'weights': weights, 'layer': self.name, 'kind': self.kind,
            'depth': self.depth, 'height': self.height, 'width': self.width, 'tokens': self.tokens,
            'channels': self.channels, 'dead': self.dead, 'dead_fraction': f'{self.fraction(self.dead):.6g}',
            'flat': self.flat, 'massive': self.massive, 'dead_ids': ';'.join(map(str, self.dead_ids)),
            'massive_ids': ';'.join(map(str, self.massive_ids)), 'label': self.label,
            'flat_fraction': f'{self.fraction(self.flat):.6g}',
            'massive_fraction': f'{self.fraction(self.massive):.6g}',
            'flat_ids': ';'.join(map(str, self.flat_ids)),
            'procedure': procedure, 'max_abs': f'{abs(top.value):.6g}', 'max_abs_channel': top.channel,
            'max_abs_row': top.row, 'max_abs_col': top.col, 'median_abs': f'{self.median_abs:.6g}',
            'max_abs_ratio': f'{self.max_abs_ratio:.6g}', 'sun_massive': self.sun_massive,
            'median_token_norm': f'{self.median_token_norm:.6g}', 'max_token_norm': f'{self.max_token_norm:.6g}',
            'high_norm_tokens': self.high_norm_tokens,
            'high_norm_fraction': f'{self.high_norm_tokens / self.tokens if self.tokens else 0.0:.6g}',
        }


def summarize(layer: Layer, thresholds: Thresholds = Thresholds()) -> LayerSummary:
    """Flags and figures of one layer, from the statistics reduced during capture (or from its full map)."""
    reduced = layer.stats if isinstance(layer.stats, LayerStats) else layer_stats(layer.fmap)
    flags = reduced.channels.flags(thresholds)
    width = layer.width
    top = [TopActivation(float(value), int(channel), int(position) // width, int(position) % width)
           for value, channel, position in zip(reduced.top_values.tolist(), reduced.top_channels.tolist(),
                                               reduced.top_positions.tolist())]
    median_norm = float(reduced.token_norms.median())
    return LayerSummary(
        name=layer.name, label=layer.label, kind=layer.kind, depth=layer.depth, height=layer.height,
        width=width, channels=layer.channels, dead_ids=_ids(flags['dead']), flat_ids=_ids(flags['flat']),
        massive_ids=_ids(flags['massive']), stats=reduced.channels, token_norms=reduced.token_norms, top=top,
        median_abs=float(reduced.median_abs), sun_massive=int(reduced.sun_massive),
        median_token_norm=median_norm, max_token_norm=float(reduced.token_norms.max()),
        high_norm_tokens=int((reduced.token_norms > thresholds.high_norm_factor * median_norm).sum()),
        high_norm_factor=thresholds.high_norm_factor)


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


@dataclass
class ChannelCounts:
    """In how many of ``images`` each channel of one model x procedure x layer was dead."""
    label: str
    kind: str
    depth: int
    dead_images: torch.Tensor  # (C,) int64
    images: int = 0

    @property
    def frequency(self) -> torch.Tensor:
        """(C,) fraction of images in which each channel was dead."""
        return self.dead_images.double() / max(1, self.images)


class DeadChannelCounter:
    """Across many images: in how many was each channel of each model x procedure x layer dead."""

    def __init__(self) -> None:
        self._counts: Dict[Tuple[str, str, str, str], ChannelCounts] = {}

    def add(self, model: str, weights: str, summary: LayerSummary, procedure: str = REAL_FORWARD) -> None:
        key = (model, weights, procedure, summary.name)
        counts = self._counts.get(key)
        if counts is None:
            counts = self._counts[key] = ChannelCounts(summary.label, summary.kind, summary.depth,
                                                       torch.zeros(summary.channels, dtype=torch.long))
        counts.dead_images[summary.dead_ids] += 1
        counts.images += 1

    def layers(self, model: str, procedure: str = REAL_FORWARD) -> List[Tuple[str, ChannelCounts]]:
        """(layer name, counts) of one model and procedure, in depth order."""
        found = [(key[3], counts) for key, counts in self._counts.items() if key[0] == model and key[2] == procedure]
        return sorted(found, key=lambda item: item[1].depth)

    def frequency_matrix(self, model: str, procedure: str = REAL_FORWARD) -> torch.Tensor:
        """(layers, widest layer's channels) dead frequencies in depth order, NaN past a layer's channels."""
        layers = self.layers(model, procedure)
        width = max((counts.dead_images.numel() for _, counts in layers), default=0)
        matrix = torch.full((len(layers), width), math.nan, dtype=torch.float64)
        for row, (_, counts) in enumerate(layers):
            matrix[row, :counts.dead_images.numel()] = counts.frequency
        return matrix

    def rows(self) -> Iterable[Dict[str, object]]:
        for (model, weights, procedure, layer), counts in self._counts.items():
            for channel, dead_images in enumerate(counts.dead_images.tolist()):
                yield {
                    'model': model, 'weights': weights, 'layer': layer, 'kind': counts.kind,
                    'depth': counts.depth, 'channel': channel, 'images': counts.images, 'dead_images': dead_images,
                    'dead_fraction': f'{dead_images / counts.images:.6g}', 'procedure': procedure,
                }
