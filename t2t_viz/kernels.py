"""Fused CPU reductions of a feature map for :mod:`t2t_viz.stats`, compiled with numba.

PyTorch reduces a map one statistic at a time, each a separate read of the map, and the exact median needs
several more; on a ResNet, whose forward pass is cheap next to its maps' size, that cost more than the
forward itself. Here one read of the map gives every per-channel figure, the token norms and the count of
zeros; when zeros are not half the map, the median |x| is exact, with no sort and no copy of the map. On
CPUs with AVX-512 (and maps of 16,384 values or more), a sample of the map's nonzero |x| sets a narrow
bracket that holds the median with high probability, a second read counts the values below it and gathers
those in it 16 at a time (AVX-512's compress), and a selection among these picks the median; where the
bracket misses, and on other CPUs, a second read counts |x| into bins by the high bits of its float32
pattern and a third collects the values of the one bin that holds the median (on ResNet50's largest maps at
224, in a pass's hooks, 400-480 us a median against 130-150 us by the bracket). The same call takes the token
norms' median (by the same selection) and maximum, and counts Sun et al.'s massive activations when the
largest |x| is over their bar.

Works on float32 maps seen as (C, N) in either memory layout a capture produces: channel-major (a CNN's
(C, H, W) map) or token-major (a ViT's (N, C) tokens), in one call per map. The passes over the whole map
(the first pass, the median's histogram, display pooling) are spread over as many threads as PyTorch's own
(numba's OpenMP threading layer; one thread where it cannot load), each thread taking one contiguous run of
the map's memory, as PyTorch's element-wise layers cut it between threads: a capture hook then reads the
run that its own core has just written, still in that core's cache. Runs split the other way (every row
cut in two) were barely faster than one thread in the hooks of a ResNet50 pass (4.1 against 4.6 ms for the
first pass at 224), runs of whole channels 1.5 times faster (3.0 ms). Per-channel sums stay within one run
in channel-major maps; token sums of squares (and token-major maps' channel sums) add the runs' sums in
run order, so a thread count always gives the same figures, and one thread the figures of a plain loop.
A single run (one thread, or the token norms' median) is read by the calling thread without starting numba's.

Order keys: a float32's bit pattern ``b`` read as int32, with ``b ^ ((b >> 31) & 0x7FFFFFFF)``, orders as
the floats do (NaNs beyond the infinities), so minimum and maximum are integer reductions that the
compiler vectorizes, with NaN propagated as PyTorch's ``amax`` does.
"""
from __future__ import annotations

import os
import threading
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ['FusedReduction', 'fused_available', 'readable', 'reduce_map', 'reduce_array', 'count_over',
           'first_max_positions', 'flag_ids', 'average_pool', 'compile_kernels']

_FINEST_SHIFT = 17  # the median's histogram bins |x| by its bits >> 17 at most: 8 exponent, 6 mantissa bits
_COARSEST_SHIFT = 25  # and >> 25 at least (64 bins), so that its counters never outweigh a small map
_SUBHISTOGRAMS = 4  # independent counters for neighbouring values, so increments do not wait on each other
_COLLECT_BLOCK = 64  # values the median's last pass counts at once before it copies any
_ZERO_BLOCK = 8  # values the median's histogram checks for all zeros at once (see _count_bins)
_DIRECT_SELECTION = 8192  # up to this many values, a median is selected among copies of them all
_BRACKET_FROM = 1 << 14  # from this many values, the median is first looked for in a bracket a sample sets
_BRACKET_SIGMAS = 4.0  # the bracket's half-width in standard deviations of the sample's rank, plus two values
_SCATTER = 40503  # spreads the sampled places over their windows (odd, so that they do not line up in rows)
_BRACKET_BINS = 1024  # bins of the bracket's range in which the median is then looked for
_GATHER_LANES = 16  # values the bracket's pass compares and gathers at once (one AVX-512 register of int32)
_SPREAD_GATHER_FROM = 1 << 18  # the bracket's pass over maps this large is spread over the threads
_POSITIVE_INFINITY_KEY = 0x7F800000
_NEGATIVE_INFINITY_KEY = -0x7F800001  # the order key of -inf
_POSITIVE_INFINITY_BITS = 0x7F800000
_FLOAT16_LARGEST = np.float32(np.finfo(np.float16).max)  # 65504
_FLOAT16_MAX_BITS = _FLOAT16_LARGEST.view(np.int32)  # its float32 bits
_FLOAT16_MIN_NORMAL_BITS = np.float32(np.finfo(np.float16).smallest_normal).view(np.int32)  # 2**-14's
_REBIAS = np.int32(112 << 23)  # float32's exponent bias (127) less float16's (15), in place
_FLOAT16_NAN = np.int32(0x7E00)
_NAN_BITS = np.int32(0x7FC00000)
# int32 constants, so that the kernels' integer arithmetic stays 32 bits wide (twice the lanes of int64)
_MAGNITUDE = np.int32(0x7FFFFFFF)  # clears the sign bit
_SIGN_SHIFT = np.int32(31)
_MIN_KEY, _MAX_KEY = np.int32(-0x80000000), np.int32(0x7FFFFFFF)

try:
    import numba
except ImportError:  # the statistics fall back to PyTorch's reductions
    numba = None


class FusedReduction:
    """What one fused reduction of a (C, N) map gives: CPU tensors viewing the two arrays that :func:`_reduce`
    wrote, each made when read (:meth:`array` gives the NumPy view itself). A capture hook then runs little
    more than the kernel: there, every Python step runs on caches that the forward pass has just evicted,
    several times slower than after the pass (building these tensors in the hooks cost a ResNet50 pass at
    224 about 2 ms).

    Attributes (tensors): minimum, maximum, max_abs (C,) float32, NaN where the channel holds a NaN; mean (C,)
    float32, summed in float64; token_norms (N,) float32, squares summed in float64; top_values (k,) float32,
    the signed values of the k largest |x|, largest first; top_channels, top_positions (k,) int64; median_abs,
    median_token_norm, max_token_norm () float32 (medians exact and lower); sun_massive () int64, values with
    |x| > max(100, 1000 x median |x|)."""

    def __init__(self, floats: np.ndarray, ints: np.ndarray, channels: int, tokens: int, flags: np.ndarray,
                 copied_float16: bool = False):
        self.floats, self.ints = floats, ints  # (4 C + N + k + 3,) float32, (2 k + 1,) int64
        self.flags = flags  # (4 + 3 C,) int64 counts and ids of the channel flags, or (0,) when not flagged
        self.copied_float16 = copied_float16  # whether the call also wrote the map's float16 copy
        self.channels, self.tokens, self.k = channels, tokens, (ints.shape[0] - 1) // 2
        self._views: Optional[Dict[str, np.ndarray]] = None

    def flag_lists(self) -> Optional[Tuple[List[int], List[int], List[int], int]]:
        """What :func:`flag_ids` gives under the bounds the reduction was asked for; None when not asked."""
        if not self.flags.shape[0]:
            return None
        dead, flat, massive, high_norm = self.flags[:4].tolist()
        return _id_lists(self.flags[4:], dead, flat, massive, high_norm)

    def array(self, name: str) -> np.ndarray:
        """The figure ``name`` (one of the attributes) as a NumPy view of the kernel's output."""
        if self._views is None:  # made once, after the pass, when first asked for
            channels, tokens, k, floats = self.channels, self.tokens, self.k, self.floats
            per_channel = floats[:4 * channels].reshape(4, channels)
            top = 4 * channels + tokens
            self._views = {
                'minimum': per_channel[0], 'maximum': per_channel[1], 'max_abs': per_channel[2],
                'mean': per_channel[3], 'token_norms': floats[4 * channels:top], 'top_values': floats[top:top + k],
                'median_abs': floats[top + k:top + k + 1].reshape(()),
                'median_token_norm': floats[top + k + 1:top + k + 2].reshape(()),
                'max_token_norm': floats[top + k + 2:top + k + 3].reshape(()),
                'top_channels': self.ints[:k], 'top_positions': self.ints[k:2 * k],
                'sun_massive': self.ints[2 * k:].reshape(())}
        return self._views[name]

    def _tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.array(name))

    minimum = property(lambda self: self._tensor('minimum'))
    maximum = property(lambda self: self._tensor('maximum'))
    max_abs = property(lambda self: self._tensor('max_abs'))
    mean = property(lambda self: self._tensor('mean'))
    token_norms = property(lambda self: self._tensor('token_norms'))
    top_values = property(lambda self: self._tensor('top_values'))
    top_channels = property(lambda self: self._tensor('top_channels'))
    top_positions = property(lambda self: self._tensor('top_positions'))
    median_abs = property(lambda self: self._tensor('median_abs'))
    median_token_norm = property(lambda self: self._tensor('median_token_norm'))
    max_token_norm = property(lambda self: self._tensor('max_token_norm'))
    sun_massive = property(lambda self: self._tensor('sun_massive'))

    @property
    def largest_magnitude(self) -> float:
        """The map's largest |x| (NaN when it holds a NaN: the kernel ranks NaN over every number)."""
        return abs(float(self.floats[4 * self.channels + self.tokens]))


# T2T_VIZ_FUSED=0 switches the kernels off. Read once: looking the variable up for every map cost a ResNet50
# pass at 224 0.35 ms, in hooks where Python runs on caches the forward pass has just evicted.
_SWITCHED_OFF = os.environ.get('T2T_VIZ_FUSED', '1') == '0'


def fused_available() -> bool:
    """Whether the fused kernels can run here (numba installed, not switched off by T2T_VIZ_FUSED=0)."""
    return numba is not None and not _SWITCHED_OFF


def _openmp_loads() -> bool:
    """Whether numba's OpenMP threading layer is there to spread passes over threads (it needs the system's
    libgomp; its other layers hand work to threads too slowly for a pass of a millisecond, and its workqueue
    layer cannot take calls from two threads at once), unless switched off with T2T_VIZ_PARALLEL=0, another
    layer is asked for with NUMBA_THREADING_LAYER, or the process started another layer before."""
    if numba is None or os.environ.get('T2T_VIZ_PARALLEL', '1') == '0' \
            or numba.config.THREADING_LAYER not in ('default', 'omp'):
        return False
    from numba.np.ufunc import parallel
    if parallel._is_initialized:  # the process already runs numba's threads: only OpenMP ones will do
        return numba.threading_layer() == 'omp'
    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        return False
    numba.config.THREADING_LAYER = 'omp'
    return True


_PARALLEL = _openmp_loads()
# prange loops only: numba would otherwise turn array expressions into parallel loops of their own
_PRANGE_ONLY = {'prange': True, 'comprehension': False, 'reduction': False, 'inplace_binop': False,
                'setitem': False, 'numpy': False, 'stencil': False, 'fusion': False}

if numba is not None:
    _jit = numba.njit(nogil=True, cache=True)
    _summing = numba.njit(nogil=True, cache=True, fastmath={'reassoc', 'nsz'})  # sums may be reordered: vectorized
    _inlined = numba.njit(nogil=True, cache=True, fastmath={'reassoc', 'nsz'}, inline='always')
    _spread = numba.njit(nogil=True, cache=True, fastmath={'reassoc', 'nsz'},
                         parallel=_PRANGE_ONLY if _PARALLEL else False)  # prange over runs of the map
    _prange = numba.prange
    import llvmlite.binding
    from llvmlite import ir as llvm_ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    # the display copy is written in the statistics' first read where the CPU converts to float16 itself (x86's
    # F16C), which LLVM vectorizes; elsewhere PyTorch copies it
    def _compiles_for(feature: str) -> bool:
        """Whether numba's code may use the CPU feature (LLVM's name for it): the host's features, unless
        NUMBA_CPU_NAME or NUMBA_CPU_FEATURES choose another target (a cache made for other machines)."""
        if numba.config.CPU_FEATURES is not None:
            return f'+{feature}' in numba.config.CPU_FEATURES.split(',')
        if numba.config.CPU_NAME not in (None, 'host'):
            return False
        return bool(llvmlite.binding.get_host_cpu_features().get(feature, False))

    _HARDWARE_FLOAT16 = _compiles_for('f16c')
    # a large map's median is found in a narrow bracket whose values AVX-512 gathers 16 at a time (its register
    # compress); elsewhere the histogram alone finds it (a gather one value at a time cost more than it saves)
    _VECTOR_GATHER = _compiles_for('avx512f')

    @intrinsic
    def _float16_bits(typing_context, value):
        """The float16 bit pattern (int16) of a float32, rounded to nearest even as PyTorch converts."""
        if value != numba.types.float32:
            return None

        def generate(context, builder, signature, arguments):
            if _HARDWARE_FLOAT16:
                return builder.bitcast(builder.fptrunc(arguments[0], llvm_ir.HalfType()), llvm_ir.IntType(16))
            # LLVM would call a runtime function for the conversion, which numba's JIT may not find: the same
            # rounding in integer arithmetic (pooled display copies; whole copies are left to PyTorch there)
            bits = builder.bitcast(arguments[0], llvm_ir.IntType(32))
            return context.compile_internal(builder, lambda b: np.int16(_clamped_float16_bits(b)),
                                            numba.types.int16(numba.types.int32), [bits])
        return numba.types.int16(numba.types.float32), generate

    @intrinsic
    def _gather_block(typing_context, bits, start, low, width, out, found):
        """The |x| bit patterns of bits[start:start + 16] that lie in [low, low + width], written in order from
        out[found] (all 16 lanes are stored: out needs 16 values of room past the last), and how many there
        are, with how many lie below ``low`` in the high 32 bits of the int64 returned."""
        def generate(context, builder, signature, arguments):
            source, first, low_bits, width_bits, destination, position = arguments
            int32 = llvm_ir.IntType(32)
            lanes = llvm_ir.VectorType(int32, _GATHER_LANES)
            masks = llvm_ir.IntType(_GATHER_LANES)

            def splat(value):
                vector = builder.insert_element(llvm_ir.Constant(lanes, llvm_ir.Undefined), value, int32(0))
                return builder.shuffle_vector(vector, llvm_ir.Constant(lanes, llvm_ir.Undefined),
                                              llvm_ir.Constant(lanes, [0] * _GATHER_LANES))

            def pointer(array_type, array, index):
                data = context.make_array(array_type)(context, builder, array).data
                return builder.bitcast(builder.gep(data, [index]), lanes.as_pointer())

            def count(mask):
                popcount = cgutils.get_or_insert_function(builder.module, llvm_ir.FunctionType(masks, [masks]),
                                                          f'llvm.ctpop.i{_GATHER_LANES}')
                return builder.zext(builder.call(popcount, [builder.bitcast(mask, masks)]), llvm_ir.IntType(64))

            values = builder.load(pointer(signature.args[0], source, first), align=4)
            magnitudes = builder.and_(values, llvm_ir.Constant(lanes, [0x7FFFFFFF] * _GATHER_LANES))
            inside = builder.icmp_unsigned('<=', builder.sub(magnitudes, splat(low_bits)), splat(width_bits))
            below = builder.icmp_unsigned('<', magnitudes, splat(low_bits))
            target = pointer(signature.args[4], destination, position)
            flags = llvm_ir.VectorType(llvm_ir.IntType(1), _GATHER_LANES)
            if _VECTOR_GATHER:  # compress into a register, then store it whole: AVX-512's fast form
                compress = cgutils.get_or_insert_function(
                    builder.module, llvm_ir.FunctionType(lanes, [lanes, lanes, flags]),
                    f'llvm.x86.avx512.mask.compress.v{_GATHER_LANES}i32')
                builder.store(builder.call(compress, [magnitudes, llvm_ir.Constant(lanes, llvm_ir.Undefined),
                                                      inside]), target, align=4)
            else:  # compiled, never run: LLVM's portable compressing store
                compress = cgutils.get_or_insert_function(
                    builder.module, llvm_ir.FunctionType(llvm_ir.VoidType(), [lanes, target.type, flags]),
                    f'llvm.masked.compressstore.v{_GATHER_LANES}i32')
                builder.call(compress, [magnitudes, target, inside])
            return builder.or_(count(inside), builder.shl(count(below), llvm_ir.Constant(llvm_ir.IntType(64), 32)))
        contiguous = numba.types.Array(numba.types.int32, 1, 'C')
        if bits != contiguous or out != contiguous or low != numba.types.int32 or width != numba.types.int32:
            return None
        return numba.types.int64(bits, start, low, width, out, found), generate
else:  # never called: fused_available() is False
    def _jit(function):
        return function
    _summing = _spread = _inlined = _jit
    _prange = range
    _HARDWARE_FLOAT16 = _VECTOR_GATHER = False


_caller = threading.local()  # per calling thread: numba's thread count set here, and PyTorch's it followed


def _parts(parts: Optional[int] = None) -> int:
    """Runs to cut a map into: ``parts`` if given, else one per PyTorch intra-op thread (at most numba's
    threads) where the OpenMP layer loaded, else 1; numba's thread count for this caller is set to match
    (asking numba for it cost about 10 us a map inside a forward pass's hooks, so it is set on a change of
    PyTorch's)."""
    if not _PARALLEL:
        return max(1, parts or 1)
    torch_threads = torch.get_num_threads()
    if getattr(_caller, 'torch_threads', None) != torch_threads:
        _caller.threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
        numba.set_num_threads(_caller.threads)
        _caller.torch_threads = torch_threads
    return parts or _caller.threads


@_jit
def _run(size, parts, part):
    """[first, end) of run ``part`` of ``parts`` near-equal contiguous runs of ``size`` items."""
    return size * part // parts, size * (part + 1) // parts


@_spread
def _channel_major(values, bits, key_max, key_min, sums, squares, half, parts):
    """A (C, N) map: per-channel order keys and sums, per-token sums of squares, and, unless ``half`` (C, N)
    int16 has no rows, the map's float16 bit patterns in it (clamped to float16's range; NaN kept); returns
    how many values are zero (either sign). Each of ``parts`` runs of whole channels is one thread's."""
    channels, tokens = values.shape
    later_squares = np.empty((parts - 1, tokens))  # each later run's own token sums, added in run order
    run_zeros = np.zeros(parts, np.int64)
    for part in _prange(parts):
        first, end = _run(channels, parts, part)
        run_zeros[part] = _channel_run(values[first:end], bits[first:end], key_max[first:end],
                                       key_min[first:end], sums[first:end],
                                       squares if part == 0 else later_squares[part - 1], half[first:end])
    for later in range(parts - 1):
        for n in range(tokens):
            squares[n] += later_squares[later, n]
    return run_zeros.sum()


@_summing
def _channel_run(values, bits, key_max, key_min, sums, squares, half):
    """``_channel_major`` of one run of channels: squares (N,) gets the run's own token sums of squares."""
    zeros = 0
    squares[:] = 0.0
    for c in range(values.shape[0]):
        if half.shape[0]:
            key_max[c], key_min[c], sums[c], row_zeros = _channel_row(values[c], bits[c], squares, half[c])
        else:
            key_max[c], key_min[c], sums[c], row_zeros = _channel_row(values[c], bits[c], squares, None)
        zeros += row_zeros
    return zeros


@_inlined
def _channel_row(row, row_bits, squares, half):
    """One channel's order keys' maximum and minimum, sum and zero count, its squares added to ``squares``,
    and its float16 bit patterns written to ``half`` unless it is None (compiled apart, and inlined: in the
    same loop, the copy costs less than a second read of the row, 2.75 against 2.83 ms on one thread for
    ResNet50's maps at 224, and nothing without it: 1.97 against 2.06 ms)."""
    high, low, total, zeros = _MIN_KEY, _MAX_KEY, 0.0, np.int32(0)
    for n in range(row.shape[0]):
        b = row_bits[n]
        key = _order_key(b)
        high = max(high, key)
        low = min(low, key)
        value = np.float64(row[n])
        total += value
        squares[n] += value * value
        zeros = np.int32(zeros + np.int32(b & _MAGNITUDE == 0))
        if half is not None:
            half[n] = _float16_of(row[n])
    return high, low, total, zeros


@_jit
def _float16_of(value):
    """The float16 bit pattern (int16) of float32 ``value``, clamped to float16's range, NaN kept."""
    value = _FLOAT16_LARGEST if value > _FLOAT16_LARGEST else value
    return _float16_bits(-_FLOAT16_LARGEST if value < -_FLOAT16_LARGEST else value)


@_spread
def _token_major(values, bits, key_max, key_min, sums, squares, parts):
    """An (N, C) map of tokens: as ``_channel_major``, each of ``parts`` runs of whole tokens one thread's;
    the runs' per-channel figures are combined in run order."""
    tokens, channels = values.shape
    highs, lows = np.empty((parts, channels), np.int32), np.empty((parts, channels), np.int32)
    totals = np.empty((parts, channels))
    run_zeros = np.zeros(parts, np.int64)
    for part in _prange(parts):
        first, end = _run(tokens, parts, part)
        run_zeros[part] = _token_run(values[first:end], bits[first:end], highs[part], lows[part], totals[part],
                                     squares[first:end])
    for c in range(channels):
        high, low, total = highs[0, c], lows[0, c], totals[0, c]
        for part in range(1, parts):
            high = max(high, highs[part, c])
            low = min(low, lows[part, c])
            total += totals[part, c]
        key_max[c], key_min[c], sums[c] = high, low, total
    return run_zeros.sum()


@_summing
def _token_run(values, bits, key_max, key_min, sums, squares):
    """``_token_major`` of one run of tokens: the run's per-channel figures, and its tokens' sums of squares."""
    zeros = 0
    key_max[:] = _MIN_KEY
    key_min[:] = _MAX_KEY
    sums[:] = 0.0
    for n in range(values.shape[0]):
        token, token_bits = values[n], bits[n]
        square, token_zeros = 0.0, np.int32(0)
        for c in range(token.shape[0]):
            b = token_bits[c]
            key = _order_key(b)
            key_max[c] = max(key_max[c], key)
            key_min[c] = min(key_min[c], key)
            value = np.float64(token[c])
            sums[c] += value
            square += value * value
            token_zeros = np.int32(token_zeros + np.int32(b & _MAGNITUDE == 0))
        squares[n] = square
        zeros += token_zeros
    return zeros


@_jit
def _order_key(b):
    """The order key of float32 bits ``b`` (int32), kept 32 bits wide (numba widens int32 arithmetic to 64 bits,
    which halved the first pass's vector lanes for the keys and the zero count: 3.17 against 2.56 ms on one
    thread for ResNet50's maps at 224)."""
    return np.int32(b ^ ((b >> _SIGN_SHIFT) & _MAGNITUDE))


@_jit
def _combine(key_max, key_min, sums, squares, tokens, minimum_bits, maximum_bits, max_abs_bits, mean, norms):
    """Per-channel order keys and sums (C,) as float32 bit patterns and means; token norms from sums of squares.

    A channel holding a NaN gets NaN minimum, maximum and max |x|, as PyTorch's reductions give."""
    for c in range(key_max.shape[0]):
        high, low, total = key_max[c], key_min[c], sums[c]
        if high > _POSITIVE_INFINITY_KEY or low < _NEGATIVE_INFINITY_KEY:
            maximum_bits[c] = minimum_bits[c] = max_abs_bits[c] = _NAN_BITS
        else:
            maximum_bits[c] = _order_key(high)  # the key transform is its own inverse
            minimum_bits[c] = _order_key(low)
            max_abs_bits[c] = max(maximum_bits[c] & _MAGNITUDE if high >= 0 else 0,
                                  minimum_bits[c] & _MAGNITUDE if low < 0 else 0)
        mean[c] = total / tokens
    for n in range(squares.shape[0]):
        norms[n] = np.sqrt(squares[n])


@_spread
def _histogram(flat_bits, shift, counts, later_counts):
    """counts (4, bins): how many |x| of the bit patterns ``flat_bits`` fall in each bin of their bits >> shift.
    The array is cut into 1 + len(later_counts) contiguous runs, each counted by one thread into its own
    counters (the first run into ``counts``), which are then added into ``counts``; ``later_counts`` keeps
    the later runs' own."""
    parts = 1 + later_counts.shape[0]
    for part in _prange(parts):
        first, end = _run(flat_bits.shape[0], parts, part)
        _count_bins(flat_bits[first:end], shift, counts if part == 0 else later_counts[part - 1])
    for later in range(parts - 1):
        for row in range(counts.shape[0]):
            for high in range(counts.shape[1]):
                counts[row, high] += later_counts[later, row, high]


@_jit
def _count_bins(flat_bits, shift, counts):
    """counts (4, bins): ``_histogram`` of one run, neighbouring values into different rows of counters, so
    that increments do not wait on each other. A block of 8 zeros (either sign), common in a ReLU's output,
    is counted at once: runs of zeros would otherwise wait on the same 4 counters (5-10% of the histograms of
    ResNet50's maps at 224)."""
    shift = np.int32(shift)
    counts[:] = 0
    size = flat_bits.shape[0]
    zero_blocks = 0
    for i in range(0, size - _ZERO_BLOCK + 1, _ZERO_BLOCK):
        magnitudes = np.int32(0)
        for j in range(_ZERO_BLOCK):
            magnitudes |= flat_bits[i + j] & _MAGNITUDE
        if magnitudes == 0:
            zero_blocks += 1
            continue
        for j in range(_ZERO_BLOCK):
            counts[j % _SUBHISTOGRAMS, (flat_bits[i + j] & _MAGNITUDE) >> shift] += 1
    for i in range(size - size % _ZERO_BLOCK, size):
        counts[0, (flat_bits[i] & _MAGNITUDE) >> shift] += 1
    counts[0, 0] += _ZERO_BLOCK * zero_blocks


@_jit
def _find_bin(counts, rank):
    """The bin of counts (4, bins) that holds the rank-th smallest (1-based), how many values lie in lower
    bins, and how many in it."""
    before = 0
    for high in range(counts.shape[1]):
        in_bin = counts[0, high] + counts[1, high] + counts[2, high] + counts[3, high]
        if before + in_bin >= rank:
            return high, before, in_bin
        before += in_bin
    return counts.shape[1], before, 0


@_spread
def _collect(flat_bits, shift, high, chosen, later_counts):
    """chosen: every |x| bit pattern of ``flat_bits`` in bin ``high``, in memory order, each of the runs that
    ``_histogram`` cut (and counted: ``later_counts``) collected by one thread into its own stretch."""
    parts = 1 + later_counts.shape[0]
    starts = np.zeros(parts + 1, np.int64)  # where each run's values go
    starts[parts] = chosen.shape[0]
    for part in range(parts - 1, 0, -1):
        in_run = 0
        for row in range(later_counts.shape[1]):
            in_run += later_counts[part - 1, row, high]
        starts[part] = starts[part + 1] - in_run
    for part in _prange(parts):
        first, end = _run(flat_bits.shape[0], parts, part)
        _collect_run(flat_bits[first:end], shift, high, chosen[starts[part]:starts[part + 1]])


@_jit
def _collect_run(part, shift, high, chosen):
    """chosen: every |x| bit pattern of ``part`` in bin ``high``, in memory order.

    The bin holds a few hundred values of a map, so most blocks of 64 hold none: a vectorized count over
    each block decides whether it is read again value by value (a copy per value would not vectorize)."""
    shift, wanted = np.int32(shift), np.int32(high)
    first_in_bin, bin_width = np.int32(high << shift), np.uint32((1 << shift) - 1)
    found = 0
    for start in range(0, part.shape[0], _COLLECT_BLOCK):
        block = part[start:start + _COLLECT_BLOCK]
        in_bin = np.int32(0)
        for i in range(block.shape[0]):
            in_bin += np.int32(np.uint32((block[i] & _MAGNITUDE) - first_in_bin) <= bin_width)
        if in_bin:
            for i in range(block.shape[0]):
                magnitude = block[i] & _MAGNITUDE
                if magnitude >> shift == wanted:
                    chosen[found] = magnitude
                    found += 1


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
def _median_bits(flat_bits, rank, zeros, parts):
    """The rank-th smallest |x| (1-based) of the bit patterns ``flat_bits``, ``zeros`` of which are zero (either
    sign): selected among all of them when they are few; in a large map first among the few values of a bracket
    that a sample sets (on CPUs with AVX-512), else, or where the bracket missed, through a histogram."""
    size = flat_bits.shape[0]
    if zeros >= rank:
        return np.int32(0)
    if size <= _DIRECT_SELECTION:
        return np.partition(flat_bits & _MAGNITUDE, rank - 1)[rank - 1]
    if _VECTOR_GATHER and size >= _BRACKET_FROM:
        found = _bracketed_median(flat_bits, rank, zeros, parts)
        if found >= 0:
            return found
    return _histogram_median(flat_bits, rank, _bin_shift(size), parts)


@_jit
def _histogram_median(flat_bits, rank, shift, parts):
    """``_median_bits`` by a histogram of the bit patterns' high bits (over ``parts`` threads), then a selection
    among the values of the one bin that holds the answer."""
    counts = np.empty((_SUBHISTOGRAMS, 1 << (31 - shift)), np.int32)
    later_counts = np.empty((parts - 1, _SUBHISTOGRAMS, 1 << (31 - shift)), np.int32)  # each later run's own
    if parts > 1:
        _histogram(flat_bits, shift, counts, later_counts)
    else:  # the same counts, without starting threads
        _count_bins(flat_bits, shift, counts)
    high, before, in_bin = _find_bin(counts, rank)
    chosen = np.empty(in_bin, np.int32)
    if parts > 1:
        _collect(flat_bits, shift, high, chosen, later_counts)
    else:
        _collect_run(flat_bits, shift, high, chosen)
    return np.partition(chosen, rank - before - 1)[rank - before - 1]


@_jit
def _bracketed_median(flat_bits, rank, zeros, parts):
    """``_median_bits`` of a large map through a bracket: a sample of its nonzero |x| sets a range of magnitudes
    that holds the answer with high probability, one pass (vectorized, over ``parts`` threads when the map is
    large) counts the values below it and gathers those in it, and the answer is selected among these; -1 when
    the answer is not in the bracket or the bracket holds too many values (then the histogram finds it)."""
    size = flat_bits.shape[0]
    low, high, room = _bracket(flat_bits, rank, zeros)
    if parts < 2 or size < _SPREAD_GATHER_FROM:
        parts = 1
    gathered = np.empty((parts, room + 2 * _GATHER_LANES), np.int32)  # each run's own, with room for a last store
    found, below = np.empty(parts, np.int64), np.empty(parts, np.int64)
    if parts > 1:
        _gather_runs(flat_bits, low, np.int32(high - low), gathered, room, found, below)
    else:
        found[0], below[0] = _gather(flat_bits, low, np.int32(high - low), gathered[0], room)
    if found.min() < 0:
        return -1
    below_bracket = below.sum()
    if not below_bracket < rank <= below_bracket + found.sum():
        return -1
    return _select_in_bracket(gathered, found, rank - below_bracket, low, high)


@_jit
def _select_in_bracket(gathered, found, rank, low, high):
    """The rank-th smallest (1-based) of the |x| bit patterns gathered[part, :found[part]], all in [low, high]:
    counted into at most 1,024 bins of the bracket's own range (bins of the whole float range would put most
    of them into one), then selected among the values of the bin that holds it."""
    base, width = np.int64(low), np.int64(high) - np.int64(low)
    shift = 0
    while (width >> shift) >= _BRACKET_BINS:
        shift += 1
    counts = np.zeros((width >> shift) + 1, np.int64)
    for part in range(found.shape[0]):
        for i in range(found[part]):
            counts[(gathered[part, i] - base) >> shift] += 1
    wanted, before = 0, 0
    while before + counts[wanted] < rank:
        before += counts[wanted]
        wanted += 1
    chosen = np.empty(counts[wanted], np.int32)
    taken = 0
    for part in range(found.shape[0]):
        for i in range(found[part]):
            magnitude = gathered[part, i]
            if (magnitude - base) >> shift == wanted:
                chosen[taken] = magnitude
                taken += 1
    return np.partition(chosen, rank - before - 1)[rank - before - 1]


@_jit
def _bracket(flat_bits, rank, zeros):
    """(low, high, room): the bracket of |x| bit patterns [low, high] that holds the rank-th smallest |x| of
    the map with high probability, and how many values a run's pass may gather before giving up (twice the
    bracket's expected count). A sample of about size^(2/3) / 4 values, one from each window of the map; the
    zeros are left out of it and counted below the bracket, so that a map of almost half zeros (a ReLU's
    output) gets a narrow bracket at the low end of its other values."""
    size = flat_bits.shape[0]
    samples = _sample_count(size)
    window = size // samples
    sample = np.empty(samples, np.int32)
    taken = 0
    for i in range(samples):
        magnitude = flat_bits[_sampled_place(i, window)] & _MAGNITUDE
        sample[taken] = magnitude
        taken += magnitude != 0
    nonzero = size - zeros
    share = (rank - zeros) / nonzero  # where the answer lies among the nonzero values
    spread = _BRACKET_SIGMAS * np.sqrt(taken * share * (1.0 - share)) + 2.0
    first, last = int(np.floor(taken * share - spread)), int(np.ceil(taken * share + spread))
    kept = sample[:taken]
    low = np.int32(1) if first < 0 else max(np.partition(kept, first)[first], np.int32(1))
    high = _MAX_KEY if last >= taken else np.partition(kept, last)[last]
    room = min(size, int((last - first) * nonzero / max(taken, 1) * 2.0) + 1024)
    return low, high, room


@_jit
def _sample_count(size):
    """How many values ``_bracket`` samples from a map of ``size`` (at least ``_BRACKET_FROM``)."""
    return min(32768, max(1024, int(size ** (2.0 / 3.0) / 4)))


@_jit
def _sampled_place(i, window):
    """Where ``_bracket`` samples its i-th value: in the i-th window of ``window`` values, at a place that moves
    from window to window."""
    return i * window + (i * _SCATTER) % window


@_spread
def _gather_runs(flat_bits, low, width, gathered, room, found, below):
    """``_gather`` of each of len(found) contiguous runs of the map by one thread, into its row of ``gathered``."""
    parts = found.shape[0]
    for part in _prange(parts):
        first, end = _run(flat_bits.shape[0], parts, part)
        found[part], below[part] = _gather(flat_bits[first:end], low, width, gathered[part], room)


@_jit
def _gather(flat_bits, low, width, gathered, room):
    """(found, below): the |x| bit patterns of ``flat_bits`` in [low, low + width] written in order into
    ``gathered`` (room + 32 values), how many there are, and how many lie below ``low``; found is -1 when
    more than ``room`` are (the pass stops there)."""
    size = flat_bits.shape[0]
    found, below = 0, 0
    blocks_end = size - size % _GATHER_LANES
    for start in range(0, blocks_end, _GATHER_LANES):
        if found > room:
            return -1, 0
        counts = _gather_block(flat_bits, start, low, width, gathered, found)
        found += counts & 0xFFFFFFFF
        below += counts >> 32
    for i in range(blocks_end, size):
        magnitude = flat_bits[i] & _MAGNITUDE
        if magnitude < low:
            below += 1
        elif np.uint32(magnitude - low) <= np.uint32(width):
            gathered[found] = magnitude
            found += 1
    return (found, below) if found <= room else (-1, 0)


@_jit
def _bin_shift(size):
    """The histogram's bits shift for ``size`` values: as many bins as keep its counters (4 bytes x 4
    sub-histograms each) under ``size`` bytes, between 64 and 16,384 bins."""
    log_bins = 0
    while (2 << log_bins) <= size // (4 * _SUBHISTOGRAMS):
        log_bins += 1
    return min(_COARSEST_SHIFT, max(_FINEST_SHIFT, 31 - log_bins))


@_jit
def _sun_count(flat_bits, median, largest, min_magnitude, median_factor):
    """Values with |x| over Sun et al.'s bar max(min_magnitude, median_factor x median) (float32; NaN when the
    median is), counted only when the ``largest`` |x| is over it."""
    bar = median * np.float32(median_factor)
    if bar < np.float32(min_magnitude):
        bar = np.float32(min_magnitude)
    if not largest > bar:
        return 0
    box = np.empty(1, np.float32)
    box[0] = bar
    return _count_over(flat_bits, box.view(np.int32)[0])


@_jit
def _reduce(array, token_major, sun_min_magnitude, sun_median_factor, flag_bounds, floats, ints, flags, half,
            parts):
    """Every figure of a map in one call (each call from Python costs microseconds), the passes over the whole
    map spread over ``parts`` threads.

    floats (4 C + N + k + 3,) float32: minimum, maximum, max |x| and mean per channel, the N token norms, the
    k largest |x| (signed), then median |x|, median token norm, max token norm; ints (2 k + 1,) int64: the
    top activations' channels, their positions, then the count of Sun et al.'s massive activations; flags
    (4 + 3 C,) int64, unless empty: :func:`_flag_ids`'s four counts, then its ids, under ``flag_bounds``
    (dead_atol, flat_atol, massive_factor, high_norm_factor) float64; half (C, N) int16, unless it has no rows
    (always, for a token-major map): the map's float16 bit patterns, clamped to float16's range."""
    bits = array.view(np.int32)
    channels, tokens = (array.shape[1], array.shape[0]) if token_major else (array.shape[0], array.shape[1])
    k = (ints.shape[0] - 1) // 2
    figures = floats[:4 * channels].reshape((4, channels))
    norms = floats[4 * channels:4 * channels + tokens]
    top_values = floats[4 * channels + tokens:4 * channels + tokens + k]
    scalar_bits = floats[4 * channels + tokens + k:].view(np.int32)  # (3,)
    key_max, key_min = np.empty(channels, np.int32), np.empty(channels, np.int32)
    sums, squares = np.empty(channels, np.float64), np.empty(tokens, np.float64)
    if token_major:
        zeros = _token_major(array, bits, key_max, key_min, sums, squares, parts) if parts > 1 \
            else _token_run(array, bits, key_max, key_min, sums, squares)
    else:
        zeros = _channel_major(array, bits, key_max, key_min, sums, squares, half, parts) if parts > 1 \
            else _channel_run(array, bits, key_max, key_min, sums, squares, half)
    figure_bits = figures.view(np.int32)
    _combine(key_max, key_min, sums, squares, tokens, figure_bits[0], figure_bits[1], figure_bits[2], figures[3],
             norms)
    _top_magnitudes(array, bits, token_major, figure_bits[2], top_values, ints[:k], ints[k:2 * k])
    flat_bits = bits.reshape(-1)
    rank = (flat_bits.shape[0] + 1) // 2
    scalar_bits[0] = _median_bits(flat_bits, rank, zeros, parts)
    norm_bits = norms.view(np.int32)
    largest, zero_norms = np.int32(0), 0
    for n in range(tokens):
        largest = max(largest, norm_bits[n] & _MAGNITUDE)  # a NaN's pattern is over every number's
        zero_norms += norm_bits[n] & _MAGNITUDE == 0
    scalar_bits[1] = _median_bits(norm_bits, (tokens + 1) // 2, zero_norms, 1)
    scalar_bits[2] = largest
    median = floats[4 * channels + tokens + k]
    ints[2 * k] = _sun_count(flat_bits, median, abs(top_values[0]), sun_min_magnitude, sun_median_factor)
    if flags.shape[0]:
        high_norm_bar = flag_bounds[3] * np.float64(floats[4 * channels + tokens + k + 1])  # x median token norm
        flags[0], flags[1], flags[2], flags[3] = _flag_ids(figures[2], figures[0], figures[1], flag_bounds[0],
                                                           flag_bounds[1], flag_bounds[2], norms, high_norm_bar,
                                                           flags[4:])


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
def _flag_ids(max_abs, minimum, maximum, dead_atol, flat_atol, massive_factor, token_norms, high_norm_bar, ids):
    """ids (3 C,): the dead, then the flat, then the massive channels' ids, each ascending, by the definitions
    of :mod:`t2t_viz.stats` in float32 as they are there; returns how many of each, and how many token norms
    are over ``high_norm_bar``."""
    channels = max_abs.shape[0]
    dead_atol, flat_atol = np.float32(dead_atol), np.float32(flat_atol)
    codes = np.zeros(channels, np.int8)  # 1 dead, 2 flat, 4 massive
    live_max_abs = np.empty(channels, np.float32)
    live = 0
    lowest, highest = np.float32(np.inf), np.float32(0)  # of the live channels' max |x| that are not NaN
    for c in range(channels):
        largest = max_abs[c]
        if largest <= dead_atol:
            codes[c] = 1
            continue
        live_max_abs[live] = largest
        live += 1
        if largest == largest:
            lowest, highest = min(lowest, largest), max(highest, largest)
        scale = largest if not largest < np.float32(1) else np.float32(1)  # NaN stays NaN, as np.maximum
        if maximum[c] - minimum[c] <= flat_atol * scale:
            codes[c] = 2
    # the median is at least the smallest (or NaN, which NumPy sorts last and nothing is over): when the largest
    # is not over factor x the smallest, no channel is massive and the median is not needed
    if highest > np.float32(massive_factor) * lowest:
        middle = (live - 1) // 2
        bar = np.float32(massive_factor) * np.partition(live_max_abs[:live], middle)[middle]
        for c in range(channels):
            if codes[c] != 1 and max_abs[c] > bar:
                codes[c] |= 4
    found = 0
    counts = np.zeros(3, np.int64)
    for flag in range(3):
        for c in range(channels):
            if (codes[c] >> flag) & 1:
                ids[found] = c
                found += 1
                counts[flag] += 1
    high_norm = 0
    bar = np.float32(high_norm_bar)
    for n in range(token_norms.shape[0]):
        high_norm += token_norms[n] > bar
    return counts[0], counts[1], counts[2], high_norm


@_jit
def _count_over(flat_bits, threshold_bits):
    """How many |x| are over the (non-negative) float whose bits are ``threshold_bits``; NaN never is."""
    count = 0
    for i in range(flat_bits.shape[0]):
        magnitude = flat_bits[i] & _MAGNITUDE
        if threshold_bits < magnitude <= _POSITIVE_INFINITY_BITS:
            count += 1
    return count


@_jit
def _to_float16(values, out):
    """out (n,) uint16: the float16 bit patterns of float32 ``values`` (n,), as :func:`_float16_of` gives them
    (by the CPU's own conversion where it has one: 69 against 600 us a million values in integers)."""
    for i in range(values.shape[0]):
        out[i] = np.uint16(_float16_of(values[i]))


@_jit
def _clamped_float16_bits(b):
    """The float16 bit pattern (in an int32) of the float32 whose bits are ``b``, rounded to nearest even as
    PyTorch converts, with magnitudes beyond float16's largest finite value (65504, infinities included)
    clamped to it; NaN stays NaN. Integer arithmetic only: no CPU support for float16 needed."""
    sign = (b >> np.int32(16)) & np.int32(0x8000)
    magnitude = b & _MAGNITUDE
    clamped = min(magnitude, _FLOAT16_MAX_BITS)
    # a normal float16: rebias the exponent (127 -> 15) and round the mantissa's 13 dropped bits to even
    normal = (clamped - _REBIAS + np.int32(0xFFF) + ((clamped >> np.int32(13)) & np.int32(1))) >> np.int32(13)
    # a subnormal float16 (|x| < 2**-14): the 24-bit significand shifted into units of 2**-24, rounded to even
    shift = max(np.int32(14), min(np.int32(126) - (clamped >> np.int32(23)), np.int32(25)))
    significand = (clamped & np.int32(0x7FFFFF)) | np.int32(0x800000)
    subnormal = (significand + (np.int32(1) << (shift - np.int32(1))) - np.int32(1)
                 + ((significand >> shift) & np.int32(1))) >> shift
    half = normal if clamped >= _FLOAT16_MIN_NORMAL_BITS else subnormal
    return np.int32(sign | (_FLOAT16_NAN if magnitude > np.int32(_POSITIVE_INFINITY_BITS) else half))


@_spread
def _pool_channels(values, row_starts, row_ends, column_starts, column_ends, out, half, parts):
    """out[c] (oh, ow): the average of each window of values[c] (H, W), as float32, or with ``half`` as float16
    bit patterns (clamped to its range) in a uint16 ``out``; each of ``parts`` runs of whole channels one
    thread's."""
    for part in _prange(parts):
        first, end = _run(values.shape[0], parts, part)
        _pool_channel_run(values[first:end], row_starts, row_ends, column_starts, column_ends, out[first:end],
                          half)


@_summing
def _pool_channel_run(values, row_starts, row_ends, column_starts, column_ends, out, half):
    """``_pool_channels`` of one run of channels. Each output row's window rows are summed column by column (a
    vectorized pass over W), then each window's columns."""
    column_sums = np.empty(values.shape[2], np.float32)
    averages = np.empty(out.shape[2], np.float32)
    for c in range(values.shape[0]):
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
                averages[ox] = total / (rows * np.float32(column_ends[ox] - column_starts[ox]))
            _store(averages, out[c, oy], half)


@_spread
def _pool_tokens(values, row_starts, row_ends, column_starts, column_ends, out, half, parts):
    """out (C, oh, ow): the average of each window of the (H, W, C) tokens; float32, or float16 bit patterns
    with ``half``, as ``_pool_channels``; each of ``parts`` runs of output rows one thread's."""
    for part in _prange(parts):
        first, end = _run(out.shape[1], parts, part)
        _pool_token_run(values, row_starts[first:end], row_ends[first:end], column_starts, column_ends,
                        out[:, first:end], half)


@_summing
def _pool_token_run(values, row_starts, row_ends, column_starts, column_ends, out, half):
    """``_pool_tokens`` of one run of output rows, summed a whole token (C contiguous values) at a time."""
    window = np.empty(values.shape[2], np.float32)
    stored = np.empty(values.shape[2], out.dtype)
    for oy in range(out.shape[1]):
        for ox in range(out.shape[2]):
            window[:] = 0.0
            for y in range(row_starts[oy], row_ends[oy]):
                for x in range(column_starts[ox], column_ends[ox]):
                    token = values[y, x]
                    for c in range(token.shape[0]):
                        window[c] += token[c]
            count = np.float32((row_ends[oy] - row_starts[oy]) * (column_ends[ox] - column_starts[ox]))
            for c in range(window.shape[0]):
                window[c] /= count
            _store(window, stored, half)
            for c in range(window.shape[0]):
                out[c, oy, ox] = stored[c]


@_jit
def _store(averages, out, half):
    """out: float32 ``averages``, or with ``half`` their float16 bit patterns (``out`` uint16)."""
    if half:
        _to_float16(averages, out)
    else:
        out[:] = averages


def _windows(size: int, pooled: int) -> Tuple[np.ndarray, np.ndarray]:
    """[start, end) of each of ``pooled`` windows over ``size`` positions, as adaptive average pooling cuts
    them: floor(i * size / pooled) to ceil((i + 1) * size / pooled)."""
    index = np.arange(pooled, dtype=np.int64)
    return index * size // pooled, ((index + 1) * size + pooled - 1) // pooled


def average_pool(fmap: torch.Tensor, size: Tuple[int, int], out: Optional[torch.Tensor] = None,
                 parts: Optional[int] = None) -> Optional[torch.Tensor]:
    """(B, C, h, w): ``F.adaptive_avg_pool2d(fmap, size)`` of a float32 CPU map (B, C, H, W), read once in
    place, channel-major or token-major (a view of (B, H, W, C) tokens), written into ``out`` when given (a
    contiguous float32 or float16 CPU tensor; float16 averages are clamped to its range, NaN kept) or a new
    float32 tensor; None when the kernels cannot take it (the caller then uses PyTorch). Sums are float32 in
    another order than PyTorch's: equal to within float32 rounding. ``parts``: runs spread over threads
    (default: one per PyTorch thread); the figures do not depend on it."""
    if not fused_available() or fmap.device.type != 'cpu' or fmap.dtype != torch.float32 or fmap.dim() != 4 \
            or not fmap.numel() or fmap.requires_grad:
        return None
    batch, channels, height, width = fmap.shape
    if out is None:
        out = torch.empty(batch, channels, *size)
    elif out.shape != (batch, channels, *size) or out.dtype not in (torch.float32, torch.float16) \
            or out.device.type != 'cpu' or not out.is_contiguous():
        raise ValueError(f'cannot pool a {tuple(fmap.shape)} map into a {out.dtype} tensor of {tuple(out.shape)}')
    half = out.dtype == torch.float16
    written = out.view(torch.int16).numpy().view(np.uint16) if half else out.numpy()
    rows, columns = _windows(height, size[0]), _windows(width, size[1])
    parts = _parts(parts)
    if fmap.is_contiguous():
        _pool_channels(fmap.reshape(batch * channels, height, width).numpy(), *rows, *columns,
                       written.reshape(batch * channels, *size), half, parts)
    elif all(image.permute(1, 2, 0).is_contiguous() for image in fmap):
        for image, image_out in zip(fmap, written):  # (H, W, C) tokens
            _pool_tokens(image.permute(1, 2, 0).numpy(), *rows, *columns, image_out, half, parts)
    else:
        return None
    return out


def _rows(array: np.ndarray) -> Optional[Tuple[np.ndarray, bool]]:
    """(rows, token_major): ``array``, a (C, N) or (C, H, W) map, as the C-contiguous NumPy array it views,
    (C, N) channel-major or (N, C) token-major; None for another layout. Read from NumPy's flags: each
    PyTorch call (strides, contiguity, reshapes) cost a capture hook microseconds on the forward's caches."""
    if array.ndim < 2:
        return None
    channels = array.shape[0]
    if array.flags.c_contiguous:
        return array.reshape(channels, -1), False
    tokens = array.transpose(*range(1, array.ndim), 0)  # (N, C) or (H, W, C)
    if tokens.flags.c_contiguous:
        return tokens.reshape(-1, channels), True
    return None


def readable(values: torch.Tensor) -> Optional[np.ndarray]:
    """``values`` as the NumPy array the kernels read (a view), or None where they cannot take it: no numba, or
    not a float32 CPU tensor. Its checks are attributes: in a capture hook, each PyTorch call cost
    microseconds (device.type 6 us)."""
    if not fused_available() or not values.is_cpu or values.dtype is not torch.float32 or values.requires_grad \
            or not values.numel():
        return None
    return values.numpy()


def reduce_map(values: torch.Tensor, top_k: int, sun_bar: Tuple[float, float], parts: Optional[int] = None
               ) -> Optional[FusedReduction]:
    """Fused statistics of a (C, N) or (C, H, W) float32 CPU map, or None when the kernels cannot take it (no
    numba, another device or dtype, a layout other than channel- or token-major): the caller then uses PyTorch.

    ``sun_bar`` (minimum magnitude, median factor) defines Sun et al.'s massive activations, as
    :mod:`t2t_viz.stats` gives it. ``parts``: runs of the map spread over threads (default: one per PyTorch
    thread); the figures of a given count are always the same."""
    array = readable(values)
    return None if array is None else reduce_array(array, top_k, sun_bar, parts)


def reduce_array(array: np.ndarray, top_k: int, sun_bar: Tuple[float, float], parts: Optional[int] = None,
                 flag_bounds: Optional[np.ndarray] = None, float16_copy: Optional[np.ndarray] = None
                 ) -> Optional[FusedReduction]:
    """:func:`reduce_map` of a map that :func:`readable` gave (a whole batch's is read once, then indexed).

    ``flag_bounds`` (4,) float64, the (dead_atol, flat_atol, massive_factor, high_norm_factor) of
    :class:`t2t_viz.stats.Thresholds`: also flag the channels and count the high-norm tokens as
    :func:`flag_ids` does, in the same call (:meth:`FusedReduction.flag_lists`). ``float16_copy``: a
    C-contiguous int16 array of the map's shape, which gets the map's float16 bit patterns (clamped to
    float16's range, NaN kept) in the same read where the kernels can write them (a channel-major map, on a
    CPU that converts to float16 itself): :attr:`FusedReduction.copied_float16` says whether they did."""
    rows = _rows(array)
    if rows is None:
        return None
    array, token_major = rows  # C-contiguous (N, C) or (C, N)
    tokens, channels = array.shape if token_major else array.shape[::-1]
    k = min(top_k, array.size)
    floats, ints = np.empty(4 * channels + tokens + k + 3, np.float32), np.empty(2 * k + 1, np.int64)
    flags = np.empty(0 if flag_bounds is None else 4 + 3 * channels, np.int64)
    bounds = _NO_BOUNDS if flag_bounds is None else flag_bounds
    copy = float16_copy is not None and _HARDWARE_FLOAT16 and not token_major
    half = float16_copy.reshape(array.shape) if copy else _NO_COPY
    _reduce(array, token_major, float(sun_bar[0]), float(sun_bar[1]), bounds, floats, ints, flags, half,
            _parts(parts))
    return FusedReduction(floats, ints, channels, tokens, flags, copy)


_NO_BOUNDS = np.zeros(4)  # flag bounds when no channel is flagged in the reduction
_NO_COPY = np.empty((0, 0), np.int16)  # no float16 copy to write


def first_max_positions(values: np.ndarray, maximum: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """(C,) int64: where each channel's ``maximum`` (C,) first occurs in a float32 map that :func:`reduce_array`
    took, for the channels whose maximum reaches ``floor`` (C,) or (); -1 elsewhere."""
    array, token_major = _rows(values)
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
        reduce_map(values, 2, (1.0, 1.0))  # compiled for the arguments' types: any bar will do
        reduce_array(values.numpy(), 2, (1.0, 1.0), flag_bounds=np.ones(4),
                     float16_copy=np.empty(values.shape, np.int16))
        first_max_positions(values.numpy(), torch.ones(3), torch.tensor(0.0))
        count_over(values, 0.5)
    for fmap in (torch.ones(1, 3, 4, 4), torch.ones(1, 4, 4, 3).permute(0, 3, 1, 2)):
        for dtype in (torch.float32, torch.float16):
            average_pool(fmap, (2, 2), torch.empty(1, 3, 2, 2, dtype=dtype))
    return True


def flag_ids(max_abs: np.ndarray, minimum: np.ndarray, maximum: np.ndarray, thresholds, token_norms: np.ndarray,
             high_norm_bar: float) -> Tuple[List[int], List[int], List[int], int]:
    """(dead, flat, massive) channel ids (ascending) of the (C,) float32 figures under ``thresholds``
    (:class:`t2t_viz.stats.Thresholds`), and how many of the (N,) float32 token norms are over
    ``high_norm_bar`` (compared in float32, as NumPy compares them)."""
    ids = np.empty(3 * max_abs.shape[0], np.int64)
    dead, flat, massive, high_norm = _flag_ids(max_abs, minimum, maximum, float(thresholds.dead_atol),
                                               float(thresholds.flat_atol), float(thresholds.massive_factor),
                                               token_norms, float(high_norm_bar), ids)
    return _id_lists(ids, dead, flat, massive, int(high_norm))


def _id_lists(ids: np.ndarray, dead: int, flat: int, massive: int, high_norm: int
              ) -> Tuple[List[int], List[int], List[int], int]:
    """The dead, flat and massive ids that :func:`_flag_ids` wrote one after another into ``ids``, as lists."""
    listed = ids[:dead + flat + massive].tolist()  # one list, then cut: cheaper than three arrays
    return listed[:dead], listed[dead:dead + flat], listed[dead + flat:], high_norm


def count_over(values: torch.Tensor, threshold: float) -> int:
    """How many |x| of a float32 CPU map that :func:`reduce_map` took are over ``threshold`` (>= 0)."""
    array = _rows(values.numpy())[0]
    return int(_count_over(array.view(np.int32).reshape(-1), np.float32(threshold).view(np.int32)))
