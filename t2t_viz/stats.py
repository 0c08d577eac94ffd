"""Per-layer statistics of feature maps: channel flags, token norms, massive activations; rows for CSV.

Channel flags (thresholds in :class:`Thresholds`):
    * dead: every value of the channel is zero, ``max |x| <= dead_atol`` (the paper's "zero-valued" maps);
    * flat: a constant map that is not zero, ``max x - min x <= flat_atol * max(1, max |x|)``;
    * massive: a live channel whose ``max |x| > massive_factor *`` the median of the *live* channels' max |x|
      (the paper's "too large values"); dead channels never lower the reference.

Token norms and massive activations (per layer, over the patch-token grid):
    * token norm: the L2 norm over channels at each position (each token of a ViT, each pixel of a CNN map);
      a token is *high-norm* when its norm is over ``high_norm_factor`` x the layer's median token norm
      (Darcet et al. 2024, "Vision Transformers Need Registers", see outliers near 10x in large ViTs);
    * median |x|: exact, the ceil(n/2)-th smallest |x| of the layer's n values (for even n the lower of the two
      middle values, as ``torch.median``), found by :func:`kth_smallest_abs` without sorting the map;
    * top activations: the ``TOP_K`` largest |x| of the layer with their channel and position, and the
      ratio of the largest to the layer's median |x|;
    * Sun et al. 2024 ("Massive Activations in Large Language Models") call an activation massive when
      |x| > 100 and about 1000x the layer's median |x|; ``sun_massive`` counts the activations with
      |x| > max(100, 1000 x median |x|).

Prefix tokens (class, distillation and register tokens of a ViT; the class token of T2T-ViT) are not on the
grid, so feature maps never show them; they are measured apart, against the grid's own references: each
prefix token's largest |x| (and its channel), its L2 norm, its activations over Sun et al.'s bar for the
layer, and whether its norm is over ``high_norm_factor`` x the median token norm of the grid.

Every figure is reduced from the full-resolution map where it is produced (:func:`layer_stats`, called
inside the capture hook), so statistics stay exact when only a small display copy of the map is kept.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, TextIO, Tuple

import numpy as np
import torch

from .capture import REAL_FORWARD, Layer
from .kernels import FusedReduction, first_max_positions, flag_ids, fused_available, readable, reduce_array

__all__ = ['Thresholds', 'ChannelStats', 'LayerStats', 'PrefixStats', 'LayerSummary', 'PrefixToken',
           'TopActivation', 'channel_stats', 'layer_stats', 'max_positions', 'kth_smallest_abs', 'summarize',
           'CSV_COLUMNS', 'PREFIX_COLUMNS', 'write_csv', 'csv_text', 'DeadChannelCounter', 'ChannelCounts',
           'PER_CHANNEL_COLUMNS', 'TOP_K', 'SUN_MIN_MAGNITUDE', 'SUN_MEDIAN_FACTOR', 'StatisticsReduce']

PREFIX_COLUMNS = ('prefix_tokens', 'prefix_max_abs', 'prefix_max_abs_token', 'prefix_max_abs_channel',
                  'prefix_max_abs_ratio', 'prefix_sun_massive', 'prefix_norms', 'prefix_high_norm_tokens')
CSV_COLUMNS = ('image', 'model', 'weights', 'layer', 'kind', 'depth', 'height', 'width', 'tokens', 'channels',
               'dead', 'dead_fraction', 'flat', 'massive', 'dead_ids', 'massive_ids',
               'label', 'flat_fraction', 'massive_fraction', 'flat_ids',
               'procedure', 'max_abs', 'max_abs_channel', 'max_abs_row', 'max_abs_col', 'median_abs',
               'max_abs_ratio', 'sun_massive', 'median_token_norm', 'max_token_norm', 'high_norm_tokens',
               'high_norm_fraction') + PREFIX_COLUMNS
PER_CHANNEL_COLUMNS = ('model', 'weights', 'layer', 'kind', 'depth', 'channel', 'images', 'dead_images',
                       'dead_fraction', 'procedure')

TOP_K = 5  # top activations kept per layer and image
SUN_MIN_MAGNITUDE = 100.0
SUN_MEDIAN_FACTOR = 1000.0
_SUN_BAR = (SUN_MIN_MAGNITUDE, SUN_MEDIAN_FACTOR)
_DIRECT_SELECTION = 32_768  # sets up to this size are handed to kthvalue; larger ones are narrowed first


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
    minimum: torch.Tensor  # (C,)
    maximum: torch.Tensor  # (C,)

    def flags(self, thresholds: Thresholds = Thresholds()) -> Dict[str, np.ndarray]:
        """Boolean (C,) masks 'dead', 'flat', 'massive' (massive against the median of the live channels)."""
        return _channel_flags(self.max_abs.numpy(), self.minimum.numpy(), self.maximum.numpy(), thresholds)


def _channel_flags(max_abs: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, thresholds: Thresholds
                   ) -> Dict[str, np.ndarray]:
    """:meth:`ChannelStats.flags` of (C,) float32 arrays. In float32, as the statistics are; NumPy, because a
    handful of operations on a few hundred values cost PyTorch's dispatch more than the arithmetic (this runs
    for every layer of every image)."""
    dead = max_abs <= np.float32(thresholds.dead_atol)
    live = ~dead
    spread = maximum - minimum
    flat = live & (spread <= np.float32(thresholds.flat_atol) * np.maximum(max_abs, np.float32(1)))
    live_max_abs = max_abs[live]  # (live,)
    if not live_max_abs.size:
        return {'dead': dead, 'flat': flat, 'massive': np.zeros_like(dead)}
    massive = live & (max_abs > np.float32(thresholds.massive_factor) * _lower_median(live_max_abs))
    return {'dead': dead, 'flat': flat, 'massive': massive}


def _lower_median(values: np.ndarray) -> np.float32:
    """The ceil(n/2)-th smallest of n values, as torch.median gives it (NumPy's median averages two)."""
    middle = (values.size - 1) // 2
    return np.partition(values, middle)[middle]


def channel_stats(fmap: torch.Tensor) -> ChannelStats:
    """Statistics of a (C, H, W) map per channel, in float32.

    Separate max, min and sum reductions are each one vectorized read of the map (PyTorch's fused
    ``aminmax`` is 30x slower on the CPU), and none makes a float64 copy that memory estimates would miss.
    """
    values = fmap.reshape(fmap.shape[0], -1).float()  # (C, H*W); a view when fmap is float32
    maximum, minimum = values.amax(dim=1), values.amin(dim=1)
    mean = values.sum(dim=1) / values.shape[1]
    return ChannelStats(max_abs=torch.maximum(maximum, -minimum), mean=mean, minimum=minimum, maximum=maximum)


@dataclass
class PrefixStats:
    """Prefix tokens of one layer (class, distillation, register tokens), reduced beside the grid."""
    max_abs: torch.Tensor  # (P,) each prefix token's largest |x|
    max_abs_channel: torch.Tensor  # (P,) where it is
    norms: torch.Tensor  # (P,) L2 norm over channels
    sun_massive: torch.Tensor  # (P,) activations over Sun et al.'s bar of the layer


@dataclass
class LayerStats:
    """What the statistics need of one full (C, H, W) map, reduced where the map was produced."""
    channels: ChannelStats
    token_norms: torch.Tensor  # (H, W) L2 norm over channels at each position
    top_values: torch.Tensor  # (k,) the k largest |x| of the layer (signed values), largest first
    top_channels: torch.Tensor  # (k,) their channels
    top_positions: torch.Tensor  # (k,) their positions, row * W + col
    median_abs: torch.Tensor  # () exact median |x| of the layer (see kth_smallest_abs)
    sun_massive: torch.Tensor  # () activations with |x| > max(100, 1000 x median |x|)
    median_token_norm: torch.Tensor  # () the lower median of token_norms
    max_token_norm: torch.Tensor  # () the largest of token_norms (NaN when one is)
    prefix: Optional[PrefixStats] = None  # None for layers without prefix tokens
    max_positions: Optional[torch.Tensor] = None  # (C,) int64 where each channel's maximum is, -1 where not asked

    @property
    def largest_magnitude(self) -> float:
        """The map's largest |x| (NaN when it holds a NaN)."""
        return float(self.channels.max_abs.max())

    def flags_under(self, thresholds: Thresholds) -> Optional[Tuple[List[int], List[int], List[int], int]]:
        """The dead, flat and massive ids and the high-norm token count, where the reduction found them for
        these thresholds already; else None (then :func:`summarize` finds them)."""
        return None

    def _numbers(self) -> '_Numbers':
        """What :func:`summarize` reads, as NumPy arrays and Python numbers."""
        channels = self.channels
        return _Numbers(channels.max_abs.numpy(), channels.minimum.numpy(), channels.maximum.numpy(),
                        self.token_norms.reshape(-1).numpy(), self.top_values.tolist(), self.top_channels.tolist(),
                        self.top_positions.tolist(), float(self.median_abs), int(self.sun_massive),
                        float(self.median_token_norm), float(self.max_token_norm))


@dataclass
class _Numbers:
    max_abs: np.ndarray  # (C,) float32
    minimum: np.ndarray  # (C,) float32
    maximum: np.ndarray  # (C,) float32
    token_norms: np.ndarray  # (N,) float32
    top_values: List[float]
    top_channels: List[int]
    top_positions: List[int]
    median_abs: float
    sun_massive: int
    median_token_norm: float
    max_token_norm: float


class _FusedLayerStats(LayerStats):
    """LayerStats viewing the fused kernels' output (:class:`t2t_viz.kernels.FusedReduction`), whose tensors
    are made when first read: after the pass rather than inside the capture hook, where every Python step
    runs on caches the forward pass has just evicted."""

    def __init__(self, fused: FusedReduction, grid: Tuple[int, int], prefix: Optional[PrefixStats],
                 positions: Optional[torch.Tensor], thresholds: Optional[Thresholds] = None):
        self._fused, self._grid, self._thresholds = fused, grid, thresholds
        self.prefix, self.max_positions = prefix, positions

    def flags_under(self, thresholds: Thresholds) -> Optional[Tuple[List[int], List[int], List[int], int]]:
        return self._fused.flag_lists() if thresholds == self._thresholds else None  # found in the kernels' call

    @cached_property
    def channels(self) -> ChannelStats:
        fused = self._fused
        return ChannelStats(fused.max_abs, fused.mean, fused.minimum, fused.maximum)

    @cached_property
    def token_norms(self) -> torch.Tensor:
        return torch.from_numpy(self._fused.array('token_norms').reshape(self._grid))

    top_values = property(lambda self: self._fused.top_values)
    top_channels = property(lambda self: self._fused.top_channels)
    top_positions = property(lambda self: self._fused.top_positions)
    median_abs = property(lambda self: self._fused.median_abs)
    sun_massive = property(lambda self: self._fused.sun_massive)
    median_token_norm = property(lambda self: self._fused.median_token_norm)
    max_token_norm = property(lambda self: self._fused.max_token_norm)

    @property
    def largest_magnitude(self) -> float:
        return self._fused.largest_magnitude

    @property
    def copied_float16(self) -> bool:
        """Whether the kernels also wrote the map's float16 copy (see :meth:`StatisticsReduce.batch`)."""
        return self._fused.copied_float16

    def _numbers(self) -> _Numbers:  # read from the kernels' arrays: no tensor is made
        array = self._fused.array
        return _Numbers(array('max_abs'), array('minimum'), array('maximum'), array('token_norms'),
                        array('top_values').tolist(), array('top_channels').tolist(), array('top_positions').tolist(),
                        float(array('median_abs')), int(array('sun_massive')), float(array('median_token_norm')),
                        float(array('max_token_norm')))


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    """Every value as one 1-D tensor in memory order: a view when the tensor is a permuted contiguous block
    (a token map is (N, C) tokens seen as (C, H, W)), a copy otherwise. Order does not matter to a median."""
    order = sorted(range(tensor.dim()), key=lambda dim: -tensor.stride(dim))
    return tensor.permute(order).reshape(-1)


_GOLDEN = (math.sqrt(5) - 1) / 2


def _narrowing_bounds(candidates: torch.Tensor, rank: int, round_: int) -> Tuple[int, int]:
    """Bit patterns ``lo <= hi`` that bracket the ``rank``-th smallest (1-based) of ``candidates`` with high
    probability, from the order statistics of a sample (it only speeds the search up).

    The sample's positions follow the golden-ratio sequence (round ``round_`` continues it): spread evenly
    over the whole set and never in step with a map's grid, without a random generator's state."""
    size = candidates.numel()
    sample_size = min(8192, max(1024, size // 256))
    steps = torch.arange(round_ * sample_size, (round_ + 1) * sample_size, dtype=torch.float64)
    picks = ((steps * _GOLDEN) % 1.0 * size).long()  # (S,) positions in [0, size)
    sample = candidates.take(picks.to(candidates.device)).sort().values  # (S,)
    centre = (rank - 0.5) / size * sample_size
    spread = 3.0 * math.sqrt(sample_size * 0.25) + 2  # 3 standard deviations of a sample rank, and then some
    low = int(sample[max(0, math.floor(centre - spread))])
    high = int(sample[min(sample_size - 1, math.ceil(centre + spread))])
    return low, high


def kth_smallest_abs(values: torch.Tensor, rank: int, nonnegative: bool = False) -> torch.Tensor:
    """The exact ``rank``-th smallest |x| (1-based) of ``values``, as a float32 0-d tensor on their device.

    |x| is compared by its float32 bit pattern with the sign cleared, an integer whose order is that of |x|
    (``nonnegative``: the caller knows there is no sign to clear). Large sets are narrowed before
    ``kthvalue`` sees them: an evenly spread sample suggests a small bracket [lo, hi]; exact counts of the
    values below and within it say where the answer lies, and only that part is kept (zeros, and a run of
    ties at lo, are settled by counting). The result is exact whatever the sample; the sample only decides
    how fast it is found. Shape-only (meta) runs allocate what a first narrowing allocates.
    """
    bits = _flat(values.detach().float()).view(torch.int32)  # (n,)
    if not nonnegative:
        bits = bits & 0x7FFFFFFF  # the order of |x|
    if bits.is_meta:
        within = (bits >= 0) & (bits <= 1)  # (n,) the masks of a narrowing
        return bits[:max(1, bits.numel() // 16)].float().amax() * within.any()
    if not 1 <= rank <= bits.numel():
        raise ValueError(f'rank {rank} of {bits.numel()} values')
    candidates, round_ = bits, 0
    while candidates.numel() > _DIRECT_SELECTION:
        low, high = (max(1, bound) for bound in _narrowing_bounds(candidates, rank, round_))
        round_ += 1
        from_low = candidates >= low  # (m,) bool; each mask is made once and counted, then combined
        below = candidates.numel() - _count(from_low)  # with low 1: the zeros, often half of a ReLU map
        if rank <= below:
            if low == 1:
                return _as_float(0, values.device)
            candidates = candidates[~from_low]
            continue
        to_high = candidates <= high  # (m,) bool
        up_to_high = _count(to_high)
        if rank > up_to_high:
            candidates, rank = candidates[~to_high], rank - up_to_high
            continue
        if low == high:
            return _as_float(low, values.device)
        within = candidates[from_low & to_high]
        del from_low, to_high
        rank -= below
        if within.numel() * 2 > candidates.numel():  # a run of ties at low kept most of the set: settle it
            at_low = _count(within == low)
            if rank <= at_low:
                return _as_float(low, values.device)
            within, rank = within[within > low], rank - at_low
        candidates = within
    return candidates.kthvalue(rank).values.view(torch.float32)


def _as_float(bits: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32, device=device).view(torch.float32)


def _median_abs(values: torch.Tensor, nonnegative: bool = False) -> torch.Tensor:
    """The lower median of |values| (C, N). A ReLU's map is 0 at once when at least half of it is 0 (counted
    as a sum of signs, row by row: exact below 2**24 a row, and branch-free, unlike counting nonzeros of
    a map that is half zeros); for a signed map the search's first count settles that case as cheaply."""
    rank = (values.numel() + 1) // 2
    if nonnegative and not values.is_meta:
        nonzero = float(torch.sign(values).sum(dim=-1).sum(dtype=torch.float64))
        if values.numel() - nonzero >= rank:
            return torch.zeros((), device=values.device)
    return kth_smallest_abs(values, rank, nonnegative)


def _top_activations(values: torch.Tensor, max_abs: torch.Tensor, k: int) -> Tuple[torch.Tensor, ...]:
    """The k largest |x| of (C, N) values, largest first; ties go to the lower channel, then the lower
    position. They all lie in the k channels with the largest max |x| (the lower ones among equal maxima)."""
    k = min(k, values.numel())
    channels = max_abs.sort(descending=True, stable=True).indices[:k].sort().values  # (k,) ascending
    rows = values[channels]  # (k, N)
    magnitudes = rows.abs().reshape(-1)  # (k * N,) in (channel, position) order
    largest = magnitudes.topk(k)
    if values.is_meta:  # shape-only: the candidates' number is not known
        flat_index = largest.indices
    else:  # every value tied with the k-th largest |x| is a candidate; NaN ranks as the largest
        candidates = ((magnitudes >= largest.values[-1]) | magnitudes.isnan()).nonzero().flatten()
        flat_index = candidates[magnitudes[candidates].sort(descending=True, stable=True).indices[:k]]  # (k,)
    row, position = flat_index // rows.shape[1], flat_index % rows.shape[1]
    return rows[row, position], channels[row], position


def _sun_count(values: torch.Tensor, threshold: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """(rows,) activations with |x| > threshold per row of ``values``; counted only when ``largest`` is over it."""
    if values.is_meta or float(largest) > float(threshold):
        return torch.count_nonzero(values > threshold, dim=-1) + torch.count_nonzero(values < -threshold, dim=-1)
    return torch.zeros(values.shape[:-1], dtype=torch.long, device=values.device)


def _prefix_stats(prefix: torch.Tensor, threshold: torch.Tensor) -> PrefixStats:
    values = prefix.float()  # (P, C)
    magnitudes = values.abs()
    max_abs, channel = magnitudes.max(dim=1)  # (P,), (P,)
    norms = torch.linalg.vector_norm(values, dim=1)  # (P,)
    return PrefixStats(max_abs, channel, norms, _sun_count(values, threshold, max_abs.max()))


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu() if tensor.device.type not in ('cpu', 'meta') else tensor


_POSITION_CHUNK = 1 << 20  # values gathered at once when only some channels' maxima are located


def max_positions(values: torch.Tensor, maximum: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """(C,) int64 position of each channel's maximum in (C, N) ``values`` (the first, when it repeats), for
    at least the channels whose ``maximum`` reaches ``floor`` (C,); -1 for channels not located.

    A dataset's top examples need the position only where an image can enter a channel's list, which
    after the first few images is rare: those rows are gathered and searched, the others cost nothing.
    When half the channels or more qualify, one argmax over the whole map is cheaper than gathering."""
    if values.is_meta:  # shape-only: as much as when every channel is located
        return values.argmax(dim=1)
    wanted = maximum >= floor.to(maximum.device)  # (C,) NaN maxima never qualify
    if 2 * _count(wanted) >= wanted.numel():
        return values.argmax(dim=1)
    positions = torch.full(maximum.shape, -1, dtype=torch.long, device=values.device)
    channels = wanted.nonzero().flatten()  # (m,)
    step = max(1, _POSITION_CHUNK // max(1, values.shape[1]))
    for first in range(0, channels.numel(), step):
        chosen = channels[first:first + step]
        positions[chosen] = values.index_select(0, chosen).argmax(dim=1)
    return positions


def layer_stats(fmap: torch.Tensor, prefix: Optional[torch.Tensor] = None, top_k: int = TOP_K,
                position_floor: Optional[torch.Tensor] = None, thresholds: Optional[Thresholds] = None
                ) -> LayerStats:
    """Reduce one full (C, H, W) map and its (P, C) prefix tokens, if any, on the map's own device.

    ``position_floor`` (C,): also locate the maximum of every channel whose maximum reaches it (see
    :func:`max_positions`). ``thresholds``: the ones :func:`summarize` will be asked for, whose flags the
    fused kernels then find in the same call. Tensor operations only, so it also runs shape-only on the
    meta device. The results are small and on the CPU.
    """
    return StatisticsReduce(top_k, position_floor, thresholds)(fmap, prefix)


def _flag_bounds(thresholds: Optional[Thresholds]) -> Optional[np.ndarray]:
    if thresholds is None:
        return None
    return np.array([thresholds.dead_atol, thresholds.flat_atol, thresholds.massive_factor,
                     thresholds.high_norm_factor], np.float64)


def _fused_stats(array: np.ndarray, prefix: Optional[torch.Tensor], top_k: int,
                 position_floor: Optional[torch.Tensor], thresholds: Optional[Thresholds],
                 bounds: Optional[np.ndarray], float16_copy: Optional[np.ndarray] = None) -> Optional[LayerStats]:
    """layer_stats of a (C, H, W) map by the fused kernels, or None where they cannot take its layout;
    ``bounds``: :func:`_flag_bounds` of ``thresholds`` (a batch's callers make it once); ``float16_copy``: see
    :func:`t2t_viz.kernels.reduce_array`."""
    fused = reduce_array(array, top_k, _SUN_BAR, flag_bounds=bounds, float16_copy=float16_copy)
    if fused is None:
        return None
    positions = None if position_floor is None else first_max_positions(array, fused.maximum, position_floor)
    prefix_stats = None
    if prefix is not None and prefix.shape[0]:
        prefix_stats = _prefix_stats(prefix, float(_sun_bar(fused.median_abs)))
    return _FusedLayerStats(fused, array.shape[1:], prefix_stats, positions, thresholds)


def _torch_stats(fmap: torch.Tensor, prefix: Optional[torch.Tensor], top_k: int,
                 position_floor: Optional[torch.Tensor]) -> LayerStats:
    """layer_stats by PyTorch's reductions, one statistic at a time: another device or dtype, or no numba."""
    values = fmap.reshape(fmap.shape[0], -1).float()  # (C, N)
    channels = channel_stats(fmap)
    token_norms = (values * values).sum(dim=0).sqrt()  # (N,)
    top_values, top_channels, top_positions = _top_activations(values, channels.max_abs, top_k)
    nonnegative = not values.is_meta and bool(channels.minimum.min() >= 0)  # a ReLU's output
    median_abs = _median_abs(values, nonnegative)
    threshold = _sun_bar(median_abs)
    sun_massive = _sun_count(_flat(values), threshold, top_values.abs().max())
    positions = None
    if position_floor is not None:
        positions = _host(max_positions(values, channels.maximum, position_floor))
    if values.is_meta:  # shape-only
        median_norm, max_norm = token_norms.amax(), token_norms.amax()
    else:
        norms = _host(token_norms).numpy()
        median_norm, max_norm = (torch.full((), float(value)) for value in (_lower_median(norms), norms.max()))
    prefix_stats = None if prefix is None or not prefix.shape[0] else _prefix_stats(prefix, threshold)
    if prefix_stats is not None:
        prefix_stats = PrefixStats(*map(_host, (prefix_stats.max_abs, prefix_stats.max_abs_channel,
                                               prefix_stats.norms, prefix_stats.sun_massive)))
    channels = ChannelStats(*map(_host, (channels.max_abs, channels.mean, channels.minimum, channels.maximum)))
    return LayerStats(channels, *map(_host, (token_norms.reshape(fmap.shape[1:]), top_values, top_channels,
                                             top_positions, median_abs, sun_massive)),
                      median_norm, max_norm, prefix_stats, positions)


class StatisticsReduce:
    """:func:`layer_stats` as a capture's ``reduce``, per image (``__call__``) or for the images of a batch at
    once (``batch``): a float32 CPU batch goes to NumPy once, where a tensor made for each image (and read
    again) cost a capture hook microseconds on caches the forward pass has just evicted. The batch's kernels
    can also write the maps' float16 display copies as they read them (``writes_float16``)."""

    writes_float16 = True

    def __init__(self, top_k: int = TOP_K, position_floor: Optional[torch.Tensor] = None,
                 thresholds: Optional[Thresholds] = None):
        self.top_k, self.position_floor, self.thresholds = top_k, position_floor, thresholds
        self._bounds = _flag_bounds(thresholds)

    def __call__(self, fmap: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> LayerStats:
        return self.batch(fmap[None], None if prefix is None else prefix[None])[0]  # a batch of one

    def batch(self, fmaps: torch.Tensor, prefixes: Optional[torch.Tensor] = None,
              float16_copies: Optional[np.ndarray] = None) -> List[LayerStats]:
        """The statistics of each (C, H, W) map of ``fmaps`` (B, C, H, W) and its (P, C) ``prefixes`` (B, P, C).

        ``float16_copies`` (B, C, H, W) int16: where the kernels can, they write each map's float16 bit
        patterns into it, clamped to float16's range, in the read that reduces the map (a separate copy of
        every map cost a ResNet50 pass at 224 3-4 ms in its hooks); an image's ``copied_float16`` says
        whether they did."""
        arrays = readable(fmaps)  # float32 CPU maps only; else PyTorch's reductions, one statistic at a time
        results = []
        for i in range(fmaps.shape[0]):
            prefix = None if prefixes is None else prefixes[i]
            copy = None if float16_copies is None else float16_copies[i]
            fused = None if arrays is None else _fused_stats(arrays[i], prefix, self.top_k, self.position_floor,
                                                             self.thresholds, self._bounds, copy)
            results.append(_torch_stats(fmaps[i], prefix, self.top_k, self.position_floor) if fused is None else fused)
        return results


def _sun_bar(median_abs: torch.Tensor) -> torch.Tensor:
    """() Sun et al.'s bar for massive activations: max(100, 1000 x the layer's median |x|)."""
    return torch.clamp(median_abs * SUN_MEDIAN_FACTOR, min=SUN_MIN_MAGNITUDE)


class TopActivation(NamedTuple):  # a named tuple: made for every layer's top activations, at a third of the cost
    value: float
    channel: int
    row: int
    col: int


@dataclass(frozen=True)
class PrefixToken:
    """One prefix token of a layer (index 0 is the class token; then distillation and register tokens)."""
    index: int
    max_abs: float
    max_abs_channel: int
    norm: float
    sun_massive: int  # activations over Sun et al.'s bar of the layer
    high_norm: bool  # norm over high_norm_factor x the median token norm of the grid


def _ids(mask: np.ndarray) -> List[int]:
    return mask.nonzero()[0].tolist()  # mask (C,)


def _ratio(largest: float, median: float) -> float:
    return largest / median if median > 0 else (math.inf if largest > 0 else 0.0)


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
    reduced: LayerStats = field(repr=False)  # what the capture reduced; its tensors are made when first read
    top: List[TopActivation] = field(default_factory=list)  # largest |x| first
    median_abs: float = 0.0
    sun_massive: int = 0
    median_token_norm: float = 0.0
    max_token_norm: float = 0.0
    high_norm_tokens: int = 0
    high_norm_factor: float = Thresholds.high_norm_factor
    prefix: List[PrefixToken] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def stats(self) -> ChannelStats:
        return self.reduced.channels

    @property
    def token_norms(self) -> torch.Tensor:
        """(H, W) the L2 norm over channels at each position."""
        return self.reduced.token_norms

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
        return _ratio(abs(self.top[0].value) if self.top else 0.0, self.median_abs)

    @property
    def prefix_largest(self) -> Optional[PrefixToken]:
        """The prefix token holding the largest |x| of the prefix tokens, or None without prefix tokens."""
        return max(self.prefix, key=lambda token: token.max_abs) if self.prefix else None

    @property
    def prefix_max_abs_ratio(self) -> float:
        """The prefix tokens' largest |x| over the grid's median |x| (inf when that median is 0)."""
        largest = self.prefix_largest
        return _ratio(largest.max_abs, self.median_abs) if largest else math.nan

    def _prefix_columns(self) -> Dict[str, object]:
        largest = self.prefix_largest
        if largest is None:
            return {'prefix_tokens': 0, **{column: '' for column in PREFIX_COLUMNS[1:]}}
        return {
            'prefix_tokens': len(self.prefix), 'prefix_max_abs': f'{largest.max_abs:.6g}',
            'prefix_max_abs_token': largest.index, 'prefix_max_abs_channel': largest.max_abs_channel,
            'prefix_max_abs_ratio': f'{self.prefix_max_abs_ratio:.6g}',
            'prefix_sun_massive': sum(token.sun_massive for token in self.prefix),
            'prefix_norms': ';'.join(f'{token.norm:.6g}' for token in self.prefix),
            'prefix_high_norm_tokens': sum(token.high_norm for token in self.prefix),
        }

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
            **self._prefix_columns(),
        }


def summarize(layer: Layer, thresholds: Thresholds = Thresholds()) -> LayerSummary:
    """Flags and figures of one layer, from the statistics reduced during capture (or from its full map)."""
    reduced = layer.stats if isinstance(layer.stats, LayerStats) else layer_stats(layer.fmap)
    numbers = reduced._numbers()
    high_norm_bar = thresholds.high_norm_factor * numbers.median_token_norm
    found = reduced.flags_under(thresholds)
    dead_ids, flat_ids, massive_ids, high_norm_tokens = found or _flag_ids(numbers, thresholds, high_norm_bar)
    width = layer.width
    top = [TopActivation(value, channel, position // width, position % width)
           for value, channel, position in zip(numbers.top_values, numbers.top_channels, numbers.top_positions)]
    prefix = []
    if reduced.prefix is not None:
        prefix = [PrefixToken(index, max_abs, channel, norm, sun, norm > high_norm_bar)
                  for index, (max_abs, channel, norm, sun) in enumerate(zip(
                      reduced.prefix.max_abs.tolist(), reduced.prefix.max_abs_channel.tolist(),
                      reduced.prefix.norms.tolist(), reduced.prefix.sun_massive.tolist()))]
    return LayerSummary(
        name=layer.name, label=layer.label, kind=layer.kind, depth=layer.depth, height=layer.height,
        width=width, channels=layer.channels, dead_ids=dead_ids, flat_ids=flat_ids, massive_ids=massive_ids,
        reduced=reduced, top=top, median_abs=numbers.median_abs,
        sun_massive=numbers.sun_massive, median_token_norm=numbers.median_token_norm,
        max_token_norm=numbers.max_token_norm, high_norm_tokens=high_norm_tokens,
        high_norm_factor=thresholds.high_norm_factor, prefix=prefix)


def _flag_ids(numbers: _Numbers, thresholds: Thresholds, high_norm_bar: float
              ) -> Tuple[List[int], List[int], List[int], int]:
    """The dead, flat and massive channels' ids and the number of high-norm tokens: in one call of the fused
    kernels where they run (about 10 us less per layer than NumPy's dozen small operations), else by
    :func:`_channel_flags`."""
    if fused_available():
        return flag_ids(numbers.max_abs, numbers.minimum, numbers.maximum, thresholds, numbers.token_norms,
                        high_norm_bar)
    flags = _channel_flags(numbers.max_abs, numbers.minimum, numbers.maximum, thresholds)
    high_norm = int(np.count_nonzero(numbers.token_norms > np.float32(high_norm_bar)))
    return _ids(flags['dead']), _ids(flags['flat']), _ids(flags['massive']), high_norm


def write_csv(rows: Iterable[Dict[str, object]], out: TextIO, columns: Sequence[str] = CSV_COLUMNS,
              header: bool = True) -> None:
    """Each row's values of ``columns``, in their order (a missing one empty; other keys are not written).
    A plain writer: ``csv.DictWriter`` checks every row's keys against the columns, which cost the stats CLI
    0.2 ms per image of a ResNet50."""
    writer = csv.writer(out, lineterminator='\n')
    if header:
        writer.writerow(columns)
    writer.writerows([row.get(column, '') for column in columns] for row in rows)


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

    def items(self) -> Iterable[Tuple[Tuple[str, str, str, str], ChannelCounts]]:
        """((model, weights, procedure, layer), counts) in the order first seen."""
        return self._counts.items()

    def put(self, key: Tuple[str, str, str, str], counts: ChannelCounts) -> None:
        self._counts[key] = counts

    def merge(self, other: 'DeadChannelCounter') -> None:
        """Add the counts of other images: as if this counter had seen them too."""
        for key, counts in other.items():
            mine = self._counts.get(key)
            if mine is None:
                mine = self._counts[key] = ChannelCounts(counts.label, counts.kind, counts.depth,
                                                         torch.zeros_like(counts.dead_images))
            mine.dead_images += counts.dead_images
            mine.images += counts.images

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
