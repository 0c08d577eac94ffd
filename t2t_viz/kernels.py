"""Fused CPU reductions of a feature map for :mod:`t2t_viz.stats`, compiled with numba.

PyTorch reduces a map one statistic at a time, each a separate read of the map, and the exact median needs
several more; on a ResNet, whose forward pass is cheap next to its maps' size, that cost more than the
forward itself. Here one read of the map gives every per-channel figure, the token norms and the count of
zeros; when zeros are not half the map, a second read counts |x| into bins by the high bits of its float32
pattern and a third collects the values of the one bin that holds the median, which a selection picks:
exact, with no sort, no copy of the map and counters no larger than the map.

Works on float32 maps seen as (C, N) in either memory layout a capture produces: channel-major (a CNN's
(C, H, W) map) or token-major (a ViT's (N, C) tokens). A large map is cut into token ranges, one per
PyTorch thread, run on a small helper pool (numba releases the GIL). Minima, maxima, counts and each
token's norm do not depend on that cut; per-channel means are float64 sums of the parts, equal to float32
rounding whatever the number of threads.

Order keys: a float32's bit pattern ``b`` read as int32, with ``b ^ ((b >> 31) & 0x7FFFFFFF)``, orders as
the floats do (NaNs beyond the infinities), so minimum and maximum are integer reductions that the
compiler vectorizes, with NaN propagated as PyTorch's ``amax`` does.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ['FusedReduction', 'fused_available', 'reduce_map', 'count_over', 'first_max_positions',
           'average_pool', 'compile_kernels', 'CHUNK_VALUES']

CHUNK_VALUES = 1 << 17  # values a thread takes at least (512 KB of float32): smaller maps run on one thread
_FINEST_SHIFT = 17  # the median's histogram bins |x| by its bits >> 17 at most: 8 exponent, 6 mantissa bits
_COARSEST_SHIFT = 25  # and >> 25 at least (64 bins), so that its counters never outweigh a small map
_SUBHISTOGRAMS = 4  # independent counters for neighbouring values, so increments do not wait on each other
_POSITIVE_INFINITY_KEY = 0x7F800000
_NEGATIVE_INFINITY_KEY = -0x7F800001  # the order key of -inf
_POSITIVE_INFINITY_BITS = 0x7F800000
_NAN_BITS = np.int32(0x7FC00000)
# int32 constants, so that the kernels' integer arithmetic stays 32 bits wide (twice the lanes of int64)
_MAGNITUDE = np.int32(0x7FFFFFFF)  # clears the sign bit
_SIGN_SHIFT = np.int32(31)
_MIN_KEY, _MAX_KEY = np.int32(-0x80000000), np.int32(0x7FFFFFFF)

try:
    import numba
except ImportError:  # the statistics fall back to PyTorch's reductions
    numba = None


@dataclass
class FusedReduction:
    """What one fused reduction of a (C, N) map gives, as CPU tensors."""
    minimum: torch.Tensor  # (C,) float32, NaN where the channel holds a NaN
    maximum: torch.Tensor  # (C,) float32, NaN where the channel holds a NaN
    max_abs: torch.Tensor  # (C,) float32, NaN where the channel holds a NaN
    mean: torch.Tensor  # (C,) float32, summed in float64
    token_norms: torch.Tensor  # (N,) float32, squares summed in float64
    median_abs: torch.Tensor  # () float32, exact lower median of |x|
    top_values: torch.Tensor  # (k,) float32 signed values of the k largest |x|, largest first
    top_channels: torch.Tensor  # (k,) int64
    top_positions: torch.Tensor  # (k,) int64


def fused_available() -> bool:
    """Whether the fused kernels can run here (numba installed, not switched off by T2T_VIZ_FUSED=0)."""
    return numba is not None and os.environ.get('T2T_VIZ_FUSED', '1') != '0'


if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)
    _summing = numba.njit(nogil=True, cache=True, fastmath={'reassoc', 'nsz'})  # sums may be reordered: vectorized
else:  # never called: fused_available() is False
    def _jit(function):
        return function
    _summing = _jit


@_summing
def _channel_major(values, bits, first, last, key_max, key_min, sums, squares):
    """Columns first:last of a (C, N) map: per-channel order keys and sums, per-token sums of squares;
    returns how many values are zero (either sign). Loops run over slices: indexing from an offset keeps
    the compiler from vectorizing them."""
    zeros = 0
    chunk_squares = squares[first:last]
    chunk_squares[:] = 0.0
    for c in range(values.shape[0]):
        row, row_bits = values[c, first:last], bits[c, first:last]
        high, low, total, row_zeros = _MIN_KEY, _MAX_KEY, 0.0, 0
        for n in range(row.shape[0]):
            b = row_bits[n]
            key = b ^ ((b >> _SIGN_SHIFT) & _MAGNITUDE)
            high = max(high, key)
            low = min(low, key)
            value = np.float64(row[n])
            total += value
            chunk_squares[n] += value * value
            if b & _MAGNITUDE == 0:
                row_zeros += 1
        key_max[c], key_min[c], sums[c] = high, low, total
        zeros += row_zeros
    return zeros


@_summing
def _token_major(values, bits, first, last, key_max, key_min, sums, squares):
    """Rows first:last of an (N, C) map of tokens: as ``_channel_major``, for this chunk's tokens."""
    zeros = 0
    key_max[:] = _MIN_KEY
    key_min[:] = _MAX_KEY
    sums[:] = 0.0
    for n in range(first, last):
        token, token_bits = values[n], bits[n]
        square, token_zeros = 0.0, 0
        for c in range(token.shape[0]):
            b = token_bits[c]
            key = b ^ ((b >> _SIGN_SHIFT) & _MAGNITUDE)
            key_max[c] = max(key_max[c], key)
            key_min[c] = min(key_min[c], key)
            value = np.float64(token[c])
            sums[c] += value
            square += value * value
            if b & _MAGNITUDE == 0:
                token_zeros += 1
        squares[n] = square
        zeros += token_zeros
    return zeros


@_jit
def _order_key_to_bits(key):
    return key ^ ((key >> _SIGN_SHIFT) & _MAGNITUDE)  # the key transform is its own inverse


@_jit
def _combine(key_max, key_min, sums, squares, tokens, minimum_bits, maximum_bits, max_abs_bits, mean, norms):
    """The parts' partial results (parts, C) as per-channel float32 bit patterns, means and token norms.

    A channel holding a NaN gets NaN minimum, maximum and max |x|, as PyTorch's reductions give."""
    for c in range(key_max.shape[1]):
        high, low, total = key_max[0, c], key_min[0, c], sums[0, c]
        for part in range(1, key_max.shape[0]):
            high = max(high, key_max[part, c])
            low = min(low, key_min[part, c])
            total += sums[part, c]
        if high > _POSITIVE_INFINITY_KEY or low < _NEGATIVE_INFINITY_KEY:
            maximum_bits[c] = minimum_bits[c] = max_abs_bits[c] = _NAN_BITS
        else:
            maximum_bits[c] = _order_key_to_bits(high)
            minimum_bits[c] = _order_key_to_bits(low)
            max_abs_bits[c] = max(maximum_bits[c] & _MAGNITUDE if high >= 0 else 0,
                                  minimum_bits[c] & _MAGNITUDE if low < 0 else 0)
        mean[c] = total / tokens
    for n in range(squares.shape[0]):
        norms[n] = np.sqrt(squares[n])


@_jit
def _histogram(flat_bits, first, last, shift, counts):
    """counts (4, bins): how many |x| of flat_bits[first:last] fall in each bin of their bits >> shift."""
    shift = np.int32(shift)
    counts[:] = 0
    part = flat_bits[first:last]
    size = part.shape[0]
    for i in range(0, size - 3, 4):
        counts[0, (part[i] & _MAGNITUDE) >> shift] += 1
        counts[1, (part[i + 1] & _MAGNITUDE) >> shift] += 1
        counts[2, (part[i + 2] & _MAGNITUDE) >> shift] += 1
        counts[3, (part[i + 3] & _MAGNITUDE) >> shift] += 1
    for i in range(size - size % 4, size):
        counts[0, (part[i] & _MAGNITUDE) >> shift] += 1


@_jit
def _find_bin(counts, rank, offsets):
    """The bin of counts (parts, 4, bins) that holds the rank-th smallest (1-based), and how many values
    lie in lower bins; offsets (parts + 1,) gets where each part's values of that bin start in one buffer."""
    before = 0
    for high in range(counts.shape[2]):
        in_bin = 0
        for part in range(counts.shape[0]):
            in_bin += counts[part, 0, high] + counts[part, 1, high] + counts[part, 2, high] + counts[part, 3, high]
            offsets[part + 1] = in_bin
        if before + in_bin >= rank:
            offsets[0] = 0
            return high, before
        before += in_bin
    return counts.shape[2], before


@_jit
def _collect(flat_bits, first, last, shift, high, chosen):
    """chosen: every |x| bit pattern of flat_bits[first:last] in bin ``high``, in memory order."""
    part = flat_bits[first:last]
    shift, wanted = np.int32(shift), np.int32(high)
    found = 0
    for i in range(part.shape[0]):
        magnitude = part[i] & _MAGNITUDE
        if magnitude >> shift == wanted:
            chosen[found] = magnitude
            found += 1
    return found


@_jit
def _top_magnitudes(array, bits, token_major, max_abs_bits, values, channels, positions):
    """The k = len(values) largest |x| of the map with their channel and position, largest first; ties go to
    the lower channel, then the lower position. They all lie in the k channels of largest max |x| (the
    lower ones among equal maxima), which are read in channel order."""
    k = values.shape[0]
    candidates = np.zeros(max_abs_bits.shape[0], np.bool_)
    for _ in range(k):  # k selections over C channels: cheaper than sorting them
        best = -1
        for channel in range(max_abs_bits.shape[0]):
            if not candidates[channel] and (best < 0 or max_abs_bits[channel] > max_abs_bits[best]):
                best = channel
        if best >= 0:
            candidates[best] = True
    kept_bits = np.full(k, -1, np.int64)  # magnitude bits of the kept values, largest first
    tokens = array.shape[0] if token_major else array.shape[1]
    for channel in np.flatnonzero(candidates):
        for position in range(tokens):
            b = bits[position, channel] if token_major else bits[channel, position]
            magnitude = np.int64(b & _MAGNITUDE)
            if magnitude <= kept_bits[k - 1]:
                continue
            slot = k - 1
            while slot > 0 and kept_bits[slot - 1] < magnitude:
                kept_bits[slot], values[slot] = kept_bits[slot - 1], values[slot - 1]
                channels[slot], positions[slot] = channels[slot - 1], positions[slot - 1]
                slot -= 1
            kept_bits[slot] = magnitude
            values[slot] = array[position, channel] if token_major else array[channel, position]
            channels[slot], positions[slot] = channel, position


@_jit
def _median_in_one_part(flat_bits, rank, shift, counts):
    """The rank-th smallest |x| bits of a map that one thread reads: histogram, bin, selection in one call."""
    _histogram(flat_bits, 0, flat_bits.shape[0], shift, counts[0])
    offsets = np.empty(2, np.int64)
    high, before = _find_bin(counts, rank, offsets)
    chosen = np.empty(offsets[1], np.int32)
    _collect(flat_bits, 0, flat_bits.shape[0], shift, high, chosen)
    return np.partition(chosen, rank - before - 1)[rank - before - 1]


@_jit
def _reduce_in_one_part(array, bits, token_major, shift, figures, norms, top_values, top_places):
    """Every figure of a map that one thread reads, in one call (each call from Python costs microseconds):
    figures (4, C) float32 minimum, maximum, max |x| and mean per channel, norms (N,) token norms, the k
    largest |x| in top_values (k,) with their (channel, position) in top_places (2, k); returns the
    median's bits."""
    channels, tokens = figures.shape[1], norms.shape[0]
    key_max, key_min = np.empty((1, channels), np.int32), np.empty((1, channels), np.int32)
    sums, squares = np.empty((1, channels), np.float64), np.empty(tokens, np.float64)
    if token_major:
        zeros = _token_major(array, bits, 0, tokens, key_max[0], key_min[0], sums[0], squares)
    else:
        zeros = _channel_major(array, bits, 0, tokens, key_max[0], key_min[0], sums[0], squares)
    figure_bits = figures.view(np.int32)
    _combine(key_max, key_min, sums, squares, tokens, figure_bits[0], figure_bits[1], figure_bits[2], figures[3],
             norms)
    _top_magnitudes(array, bits, token_major, figure_bits[2], top_values, top_places[0], top_places[1])
    flat_bits = bits.reshape(-1)
    rank = (flat_bits.shape[0] + 1) // 2
    if zeros >= rank:
        return np.int32(0)
    counts = np.empty((1, _SUBHISTOGRAMS, 1 << (31 - shift)), np.int32)
    return _median_in_one_part(flat_bits, rank, shift, counts)


@_jit
def _first_maxima(array, token_major, maximum, floor, positions):
    """positions (C,): where each channel's maximum first is, for the channels whose maximum reaches its
    floor (NaN never does); -1 for the others. Only those channels are read."""
    channels = maximum.shape[0]
    wanted = 0
    for c in range(channels):
        positions[c] = -1
        if maximum[c] >= floor[c]:
            positions[c] = -2  # to be found
            wanted += 1
    if token_major:  # one pass over the tokens finds every wanted channel's first maximum
        for n in range(array.shape[0]):
            if wanted == 0:
                break
            token = array[n]
            for c in range(channels):
                if positions[c] == -2 and token[c] == maximum[c]:
                    positions[c] = n
                    wanted -= 1
    else:
        for c in range(channels):
            if positions[c] == -2:
                row = array[c]
                for n in range(row.shape[0]):
                    if row[n] == maximum[c]:
                        positions[c] = n
                        break


@_jit
def _count_over(flat_bits, threshold_bits):
    """How many |x| are over the (non-negative) float whose bits are ``threshold_bits``; NaN never is."""
    count = 0
    for i in range(flat_bits.shape[0]):
        magnitude = flat_bits[i] & _MAGNITUDE
        if threshold_bits < magnitude <= _POSITIVE_INFINITY_BITS:
            count += 1
    return count


@_summing
def _pool_channels(values, first, last, row_starts, row_ends, column_starts, column_ends, out):
    """out[c] (oh, ow): the average of each window of values[c] (H, W), for channels first:last. Each output
    row's window rows are summed column by column (a vectorized pass over W), then each window's columns."""
    column_sums = np.empty(values.shape[2], np.float32)
    for c in range(first, last):
        for oy in range(out.shape[1]):
            column_sums[:] = values[c, row_starts[oy]]
            for y in range(row_starts[oy] + 1, row_ends[oy]):
                row = values[c, y]
                for x in range(row.shape[0]):
                    column_sums[x] += row[x]
            rows = np.float32(row_ends[oy] - row_starts[oy])
            for ox in range(out.shape[2]):
                total = np.float32(0.0)
                for x in range(column_starts[ox], column_ends[ox]):
                    total += column_sums[x]
                out[c, oy, ox] = total / (rows * np.float32(column_ends[ox] - column_starts[ox]))


@_summing
def _pool_tokens(values, first, last, row_starts, row_ends, column_starts, column_ends, out):
    """out (C, oh, ow) for output rows first:last: the average of each window of the (H, W, C) tokens,
    summed a whole token (C contiguous values) at a time."""
    window = np.empty(values.shape[2], np.float32)
    for oy in range(first, last):
        for ox in range(out.shape[2]):
            window[:] = 0.0
            for y in range(row_starts[oy], row_ends[oy]):
                for x in range(column_starts[ox], column_ends[ox]):
                    token = values[y, x]
                    for c in range(token.shape[0]):
                        window[c] += token[c]
            count = np.float32((row_ends[oy] - row_starts[oy]) * (column_ends[ox] - column_starts[ox]))
            for c in range(window.shape[0]):
                out[c, oy, ox] = window[c] / count


def _windows(size: int, pooled: int) -> Tuple[np.ndarray, np.ndarray]:
    """[start, end) of each of ``pooled`` windows over ``size`` positions, as adaptive average pooling cuts
    them: floor(i * size / pooled) to ceil((i + 1) * size / pooled)."""
    index = np.arange(pooled, dtype=np.int64)
    return index * size // pooled, ((index + 1) * size + pooled - 1) // pooled


def average_pool(fmap: torch.Tensor, size: Tuple[int, int]) -> Optional[torch.Tensor]:
    """(B, C, h, w) float32: ``F.adaptive_avg_pool2d(fmap, size)`` of a float32 CPU map (B, C, H, W), read
    once in place, channel-major or token-major (a view of (B, H, W, C) tokens); None when the kernels cannot
    take it (the caller then uses PyTorch). Sums are float32 in another order than PyTorch's: equal to within
    float32 rounding."""
    if not fused_available() or fmap.device.type != 'cpu' or fmap.dtype != torch.float32 or fmap.dim() != 4 \
            or not fmap.numel() or fmap.requires_grad:
        return None
    batch, channels, height, width = fmap.shape
    rows, columns = _windows(height, size[0]), _windows(width, size[1])
    out = np.empty((batch, channels, *size), np.float32)
    if fmap.is_contiguous():
        values = fmap.reshape(batch * channels, height, width).numpy()
        flat_out = out.reshape(batch * channels, *size)
        calls = [lambda part=part: _pool_channels(values, *part, *rows, *columns, flat_out)
                 for part in _parts(batch * channels, height * width)]
    elif all(image.permute(1, 2, 0).is_contiguous() for image in fmap):
        images = [image.permute(1, 2, 0).numpy() for image in fmap]  # (H, W, C) each
        calls = [lambda i=i, part=part: _pool_tokens(images[i], *part, *rows, *columns, out[i])
                 for i in range(batch) for part in _parts(size[0], height * width * channels // size[0])]
    else:
        return None
    _run(calls)
    return torch.from_numpy(out)


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> Optional[ThreadPoolExecutor]:
    """Helpers for the calling thread: one fewer than PyTorch's threads (None with one thread)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None and torch.get_num_threads() > 1:
            _POOL = ThreadPoolExecutor(torch.get_num_threads() - 1, thread_name_prefix='t2t-viz-stats')
    return _POOL


def _run(calls: Sequence[Callable[[], Any]]) -> List[Any]:
    """Results of ``calls`` in order: the first on the calling thread, the others on the helper threads."""
    pool = _pool() if len(calls) > 1 else None
    if pool is None:
        return [call() for call in calls]
    helped = [pool.submit(call) for call in calls[1:]]
    return [calls[0]()] + [future.result() for future in helped]


def _parts(size: int, values_per_item: int = 1) -> List[Tuple[int, int]]:
    """[first, last) ranges of ``size`` items (tokens of ``values_per_item`` values, or single values), at
    most one per thread and each of at least CHUNK_VALUES values; a small map is one range."""
    count = max(1, min(torch.get_num_threads(), size // max(1, CHUNK_VALUES // values_per_item), size))
    bounds = [size * part // count for part in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _layout(values: torch.Tensor) -> Optional[str]:
    channels, tokens = values.shape
    if values.is_contiguous():
        return 'channel_major'
    if values.stride() == (1, channels) or tokens == 1:
        return 'token_major'
    return None


def reduce_map(values: torch.Tensor, top_k: int) -> Optional[FusedReduction]:
    """Fused statistics of a (C, N) float32 CPU map, or None when the kernels cannot take it (no numba, another
    device or dtype, a layout other than channel- or token-major): the caller then uses PyTorch."""
    if not fused_available() or values.device.type != 'cpu' or values.dtype != torch.float32 \
            or values.dim() != 2 or not values.numel() or values.requires_grad:
        return None
    layout = _layout(values)
    if layout is None:
        return None
    channels, tokens = values.shape
    token_major = layout == 'token_major'
    array = (values.t() if token_major else values).numpy()  # C-contiguous (N, C) or (C, N)
    bits = array.view(np.int32)
    k = min(top_k, values.numel())
    parts = _parts(tokens, channels)
    if len(parts) > 1:
        return _reduce_in_parts(array, bits, token_major, k, parts)
    figures, norms = np.empty((4, channels), np.float32), np.empty(tokens, np.float32)
    top_values, top_places = np.empty(k, np.float32), np.empty((2, k), np.int64)
    median = _reduce_in_one_part(array, bits, token_major, _bin_shift(bits.size), figures, norms, top_values,
                                 top_places)
    return _reduction(figures, norms, median, top_values, top_places)


def _reduction(figures: np.ndarray, norms: np.ndarray, median: int, top_values: np.ndarray,
               top_places: np.ndarray) -> FusedReduction:
    """The kernels' arrays as tensors, with as few tensor objects made as can be (each costs microseconds)."""
    figures_tensor, places = torch.from_numpy(figures), torch.from_numpy(top_places)
    median_tensor = torch.from_numpy(np.array(median, np.int32).view(np.float32))
    return FusedReduction(figures_tensor[0], figures_tensor[1], figures_tensor[2], figures_tensor[3],
                          torch.from_numpy(norms), median_tensor, torch.from_numpy(top_values), places[0], places[1])


def _reduce_in_parts(array: np.ndarray, bits: np.ndarray, token_major: bool, k: int,
                     parts: List[Tuple[int, int]]) -> FusedReduction:
    """The reduction of a map cut into token ranges that several threads read."""
    channels, tokens = (array.shape[1], array.shape[0]) if token_major else array.shape
    key_max = np.empty((len(parts), channels), np.int32)
    key_min = np.empty((len(parts), channels), np.int32)
    sums = np.empty((len(parts), channels), np.float64)
    squares = np.empty(tokens, np.float64)
    chunk = _token_major if token_major else _channel_major
    zeros = sum(_run([lambda i=i, part=part: chunk(array, bits, part[0], part[1], key_max[i], key_min[i], sums[i],
                                                   squares)
                      for i, part in enumerate(parts)]))
    figures = np.empty((4, channels), np.float32)  # minimum, maximum, max |x|, mean
    figure_bits = figures.view(np.int32)
    norms = np.empty(tokens, np.float32)
    _combine(key_max, key_min, sums, squares, tokens, figure_bits[0], figure_bits[1], figure_bits[2], figures[3],
             norms)
    top_values, top_places = np.empty(k, np.float32), np.empty((2, k), np.int64)
    _top_magnitudes(array, bits, token_major, figure_bits[2], top_values, top_places[0], top_places[1])
    return _reduction(figures, norms, _median_bits(bits.reshape(-1), zeros), top_values, top_places)


def _median_bits(flat_bits: np.ndarray, zeros: int) -> int:
    """The bit pattern of the ceil(n/2)-th smallest |x| of the n values whose bits are ``flat_bits``, given
    how many are zero: a histogram of the high bits, then a selection among the values of the one bin that
    holds the answer (counts are exact, so how the map is split between threads cannot change them)."""
    rank = (flat_bits.size + 1) // 2
    if zeros >= rank:
        return 0
    shift = _bin_shift(flat_bits.size)
    parts = _parts(flat_bits.size)
    counts = np.empty((len(parts), _SUBHISTOGRAMS, 1 << (31 - shift)), np.int32)
    if len(parts) == 1:
        return int(_median_in_one_part(flat_bits, rank, shift, counts))
    _run([lambda i=i, part=part: _histogram(flat_bits, *part, shift, counts[i]) for i, part in enumerate(parts)])
    offsets = np.empty(len(parts) + 1, np.int64)
    high, before = _find_bin(counts, rank, offsets)
    chosen = np.empty(offsets[-1], np.int32)
    _run([lambda i=i, part=part: _collect(flat_bits, *part, shift, high, chosen[offsets[i]:offsets[i + 1]])
          for i, part in enumerate(parts)])
    chosen.partition(rank - before - 1)
    return int(chosen[rank - before - 1])


def _bin_shift(size: int) -> int:
    """The histogram's bits shift for a map of ``size`` values: as many bins as keep its counters (4 bytes
    x 4 sub-histograms each) under ``size`` bytes, between 64 and 16,384 bins."""
    bins = 1 << max(0, (size // (4 * _SUBHISTOGRAMS)).bit_length() - 1)
    return min(_COARSEST_SHIFT, max(_FINEST_SHIFT, 31 - (bins.bit_length() - 1)))


def first_max_positions(values: torch.Tensor, maximum: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """(C,) int64: where each channel's ``maximum`` (C,) first occurs in a float32 CPU map that
    :func:`reduce_map` took, for the channels whose maximum reaches ``floor`` (C,) or (); -1 elsewhere."""
    token_major = _layout(values) == 'token_major'
    array = values.t().numpy() if token_major else values.numpy()
    floors = floor.numpy().astype(np.float32)
    if floors.shape != maximum.shape:
        floors = np.full(maximum.shape, floors, np.float32)
    positions = np.empty(maximum.shape, np.int64)
    _first_maxima(array, token_major, maximum.numpy(), floors, positions)
    return torch.from_numpy(positions)


def compile_kernels() -> bool:
    """Compile every kernel for the maps captures produce (numba keeps them in its cache on disk, so later
    processes load them in a fraction of a second); False when the kernels are not in use here."""
    if not fused_available():
        return False
    for values in (torch.ones(3, 5), torch.ones(5, 3).t()):  # channel-major, token-major
        reduce_map(values, 2)
        first_max_positions(values, torch.ones(3), torch.tensor(0.0))
        count_over(values, 0.5)
    _median_bits(np.arange(1, 4 * CHUNK_VALUES, dtype=np.int32), 0)  # the parts' kernels of a large map
    for fmap in (torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4, 3).permute(0, 3, 1, 2)):
        average_pool(fmap, (2, 2))
    return True


def count_over(values: torch.Tensor, threshold: float) -> int:
    """How many |x| of a float32 CPU map that :func:`reduce_map` took are over ``threshold`` (>= 0)."""
    array = values.t().numpy() if _layout(values) == 'token_major' else values.numpy()
    return int(_count_over(array.view(np.int32).reshape(-1), np.float32(threshold).view(np.int32)))
