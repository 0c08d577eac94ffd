"""Top dataset examples per channel: for every model x procedure x layer x channel, the k images in which
the channel's maximum activation was largest, with that value and where on the grid it was.

Memory is O(channels x k), whatever the number of images. The lists are exact and do not depend on the
order of the images: examples are ranked by value, largest first, ties broken by image name, and a merge of
two trackers equals one tracker fed both streams (a stream, a resumed run and shards share this code).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from itertools import repeat
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .capture import REAL_FORWARD
from .stats import LayerSummary

__all__ = ['ChannelExamples', 'TopExamples', 'Example', 'TOP_EXAMPLE_COLUMNS', 'DEFAULT_TOP_K',
           'selective_channels']

TOP_EXAMPLE_COLUMNS = ('model', 'weights', 'procedure', 'layer', 'channel', 'rank', 'image', 'value', 'row', 'col')
DEFAULT_TOP_K = 8


@dataclass(frozen=True)
class Example:
    """One kept example: an image, the channel's maximum in it, and where on the (rows, cols) grid."""
    image: str
    value: float
    row: int
    col: int


class ChannelExamples:
    """The top ``k`` images of each channel of one model x procedure x layer, and each channel's mean maximum.

    Rows of the (C, k) arrays are sorted best first: larger value, then smaller image name. Empty slots hold
    value -inf, name '' and position -1.
    """

    def __init__(self, label: str, kind: str, depth: int, channels: int, height: int, width: int, k: int):
        self.label, self.kind, self.depth, self.height, self.width, self.k = label, kind, depth, height, width, k
        self.values = np.full((channels, k), -np.inf, dtype=np.float32)  # (C, k)
        self.images = np.full((channels, k), '', dtype=object)  # (C, k) image names
        self.positions = np.full((channels, k), -1, dtype=np.int64)  # (C, k) row * width + col
        self.maximum_sum = np.zeros(channels, dtype=np.float64)  # (C,) sum over images of the channel maximum
        self.image_count = 0

    @property
    def channels(self) -> int:
        return self.values.shape[0]

    def floor(self) -> torch.Tensor:
        """(C,) the value an image's maximum must reach to enter each channel's list (-inf until it is full)."""
        return torch.from_numpy(self.values[:, -1].copy())

    def add(self, image: str, maxima: np.ndarray, positions: np.ndarray) -> None:
        """One image's (C,) channel maxima and (C,) positions (-1 only where the maximum is below the floor)."""
        self.maximum_sum += maxima
        self.image_count += 1
        self._insert(image, maxima.astype(np.float32), positions)

    def merge(self, other: 'ChannelExamples') -> None:
        """Add another tracker's lists and sums of the same layer (other images): as if one had seen both."""
        if other.values.shape != self.values.shape:
            raise ValueError(f'cannot merge {other.label} ({other.values.shape}) into {self.label} '
                             f'({self.values.shape})')
        self.maximum_sum += other.maximum_sum
        self.image_count += other.image_count
        for rank in range(other.k):
            self._insert(other.images[:, rank], other.values[:, rank], other.positions[:, rank])

    def _insert(self, images, values: np.ndarray, positions: np.ndarray) -> None:
        """Insert one candidate per channel: one image's name for all, or (C,) names; (C,) values and positions.

        Names are compared only where a value ties with a list's last (string comparisons of every channel
        cost more than the rest of an image's bookkeeping)."""
        last_value = self.values[:, -1]
        finite = np.isfinite(values)
        enters = finite & (values > last_value)  # (C,)
        tied = np.flatnonzero(finite & (values == last_value))
        if tied.size:
            enters[tied] = _names(images, tied) < self.images[tied, -1]
        rows = np.flatnonzero(enters)  # (m,)
        if not rows.size:
            return
        if (positions[rows] < 0).any():
            raise ValueError(f'{self.label}: an entering maximum was not located (its floor was too high)')
        value, image = values[rows][:, None], _names(images, rows)[:, None]  # (m, 1)
        kept_values, kept_images = self.values[rows], self.images[rows]  # (m, k)
        ahead = kept_values > value  # (m, k) a prefix: the kept examples ranked before the candidate
        ties = np.nonzero(kept_values == value)
        if ties[0].size:
            ahead[ties] = kept_images[ties] < image[ties[0], 0]
        slot = ahead.sum(axis=1)[:, None]  # (m, 1) where the candidate goes
        index = np.arange(self.k)[None, :]  # (1, k)
        source = np.where(index < slot, index, np.where(index == slot, self.k, index - 1))  # (m, k) in [kept, new]

        def placed(kept: np.ndarray, new: np.ndarray) -> np.ndarray:
            return np.take_along_axis(np.concatenate([kept, new], axis=1), source, axis=1)

        self.values[rows] = placed(kept_values, value)
        self.images[rows] = placed(kept_images, image)
        self.positions[rows] = placed(self.positions[rows], positions[rows][:, None])

    def examples(self, channel: int) -> List[Example]:
        """The channel's kept examples, best first."""
        found = []
        for value, image, position in zip(self.values[channel], self.images[channel], self.positions[channel]):
            if position < 0:
                break
            found.append(Example(image, float(value), int(position) // self.width, int(position) % self.width))
        return found

    def mean_maximum(self) -> np.ndarray:
        """(C,) each channel's maximum averaged over the images seen."""
        return self.maximum_sum / max(1, self.image_count)


def _names(images, rows: np.ndarray) -> np.ndarray:
    """(m,) object array of the names of ``rows``: from (C,) names, or one name repeated."""
    if isinstance(images, np.ndarray):
        return images[rows]
    names = np.empty(rows.size, dtype=object)
    names[:] = images
    return names


class TopExamples:
    """Top examples of every model x weights x procedure x layer seen, fed one image's summaries at a time."""

    def __init__(self, k: int = DEFAULT_TOP_K):
        if k < 1:
            raise ValueError(f'top-k must be at least 1, not {k}')
        self.k = k
        self._layers: Dict[Tuple[str, str, str, str], ChannelExamples] = {}

    def floors(self, model: str, weights: str, procedure: str):
        """For :func:`t2t_viz.pipeline.inspect_images`: the floor of each layer of one model and procedure."""
        minus_infinity = torch.tensor(-math.inf)

        def floor(layer: str) -> torch.Tensor:
            found = self._layers.get((model, weights, procedure, layer))
            return minus_infinity if found is None else found.floor()

        return floor

    def add(self, image: str, model: str, weights: str, summaries: Iterable[LayerSummary],
            positions: Sequence[Optional[torch.Tensor]], procedure: str = REAL_FORWARD) -> None:
        """One image's layer summaries, and for each the (C,) located maxima (LayerStats.max_positions)."""
        for summary, located in zip(summaries, positions):
            if located is None:
                raise ValueError(f'{summary.name}: the capture did not locate channel maxima')
            key = (model, weights, procedure, summary.name)
            layer = self._layers.get(key)
            if layer is None:
                layer = self._layers[key] = ChannelExamples(summary.label, summary.kind, summary.depth,
                                                            summary.channels, summary.height, summary.width, self.k)
            layer.add(image, summary.stats.maximum.numpy(), located.numpy())

    def merge(self, other: 'TopExamples') -> None:
        if other.k != self.k:
            raise ValueError(f'cannot merge top-{other.k} lists into top-{self.k} lists')
        for key, layer in other._layers.items():
            mine = self._layers.get(key)
            if mine is None:
                mine = self._layers[key] = ChannelExamples(layer.label, layer.kind, layer.depth, layer.channels,
                                                           layer.height, layer.width, self.k)
            mine.merge(layer)

    def items(self) -> Iterable[Tuple[Tuple[str, str, str, str], ChannelExamples]]:
        """((model, weights, procedure, layer), examples) in the order first seen."""
        return self._layers.items()

    def put(self, key: Tuple[str, str, str, str], layer: ChannelExamples) -> None:
        self._layers[key] = layer

    def layer(self, model: str, weights: str, procedure: str, layer: str) -> ChannelExamples:
        return self._layers[(model, weights, procedure, layer)]

    def layers(self, model: str, procedure: str = REAL_FORWARD) -> List[Tuple[str, ChannelExamples]]:
        """(layer name, examples) of one model and procedure, in depth order."""
        found = [(key[3], layer) for key, layer in self._layers.items() if key[0] == model and key[2] == procedure]
        return sorted(found, key=lambda item: item[1].depth)

    def rows(self) -> Iterator[Dict[str, object]]:
        """One row per kept example, with the columns of TOP_EXAMPLE_COLUMNS; layers in the order first seen."""
        for row in self._row_tuples():
            yield dict(zip(TOP_EXAMPLE_COLUMNS, row))

    def csv_text(self) -> str:
        """The rows as CSV text with a header: what ``t2t-viz stats --top-examples`` and the app write."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator='\n')
        writer.writerow(TOP_EXAMPLE_COLUMNS)
        writer.writerows(self._row_tuples())
        return buffer.getvalue()

    def _row_tuples(self) -> Iterator[tuple]:
        """The rows' values in column order, a layer's at a time (a list's kept examples are a prefix of it)."""
        for (model, weights, procedure, name), layer in self._layers.items():
            channels, ranks = np.nonzero(layer.positions >= 0)  # (m,), (m,) channel by channel, best first
            rows, cols = np.divmod(layer.positions[channels, ranks], layer.width)
            values = [f'{value:.6g}' for value in layer.values[channels, ranks].tolist()]
            yield from zip(repeat(model), repeat(weights), repeat(procedure), repeat(name), channels.tolist(),
                           (ranks + 1).tolist(), layer.images[channels, ranks].tolist(), values, rows.tolist(),
                           cols.tolist())


def selective_channels(layer: ChannelExamples, limit: int = 10) -> List[Dict[str, object]]:
    """The channels whose top example stands furthest above their mean maximum over images, most first.

    The mean, not the median, of the images' maxima is the reference: it is exact in O(channels) memory and
    merges across shards, where a median over images would need every image's value."""
    top = layer.values[:, 0].astype(np.float64)  # (C,)
    mean = layer.mean_maximum()
    gap = np.where(np.isfinite(top), top - mean, -np.inf)
    order = sorted(range(layer.channels), key=lambda channel: (-gap[channel], channel))[:limit]
    return [{'channel': channel, 'top value': float(top[channel]), 'mean maximum': float(mean[channel]),
             'gap': float(gap[channel]), 'top image': layer.images[channel, 0]}
            for channel in order if np.isfinite(gap[channel])]
