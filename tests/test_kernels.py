"""The fused CPU kernels against plain NumPy on planted maps of the sizes users run (1024 and 2048 inputs)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from t2t_viz import capture, kernels, stats
from t2t_viz.stats import layer_stats

SUN_BAR = (stats.SUN_MIN_MAGNITUDE, stats.SUN_MEDIAN_FACTOR)  # the statistics' definition, which they pass

pytestmark = pytest.mark.skipif(not kernels.fused_available(), reason='numba is not installed')


def _reference(values: np.ndarray, k: int = 5) -> dict:
    """Every figure of reduce_map from a (C, N) float32 array, in NumPy, the obvious way."""
    wide = values.astype(np.float64)
    magnitudes = np.abs(values).ravel()
    rank = (magnitudes.size + 1) // 2
    channel, position = np.divmod(np.arange(values.size), values.shape[1])
    order = np.lexsort((position, channel, -magnitudes))[:k]  # largest |x|, then lower channel, then position
    return {
        'minimum': values.min(axis=1), 'maximum': values.max(axis=1), 'max_abs': np.abs(values).max(axis=1),
        'mean': (wide.sum(axis=1) / values.shape[1]).astype(np.float32),
        'token_norms': np.sqrt((wide * wide).sum(axis=0)).astype(np.float32),
        'median_abs': np.partition(magnitudes, rank - 1)[rank - 1],
        'top_values': values.ravel()[order], 'top_channels': channel[order], 'top_positions': position[order],
    }


def _check(values: torch.Tensor, k: int = 5) -> kernels.FusedReduction:
    """Every figure against NumPy with the map cut into 1, 2 and 3 runs (as many threads; 3 runs on 2 cores
    split unevenly), then once more with 2 runs: the same figures, bit for bit."""
    reduced = [_check_runs(values, k, parts) for parts in (1, 2, 3)]
    again = kernels.reduce_map(values, k, SUN_BAR, parts=2)
    np.testing.assert_array_equal(again.floats.view(np.int32), reduced[1].floats.view(np.int32))  # every bit
    np.testing.assert_array_equal(again.ints, reduced[1].ints)
    return reduced[1]


def _check_runs(values: torch.Tensor, k: int, parts: int) -> kernels.FusedReduction:
    reduced = kernels.reduce_map(values, k, SUN_BAR, parts=parts)
    expected = _reference(values.contiguous().numpy(), k)
    for name in ('minimum', 'maximum', 'max_abs', 'median_abs', 'top_values', 'top_channels', 'top_positions'):
        np.testing.assert_array_equal(getattr(reduced, name).numpy(), expected[name], err_msg=name)
    for name in ('mean', 'token_norms'):  # float64 sums, rounded once: at most one float32 step apart
        np.testing.assert_allclose(getattr(reduced, name).numpy(), expected[name], rtol=2.5e-7, atol=1e-30,
                                   err_msg=name)
    norms = reduced.token_norms.numpy()  # the token norms' figures are those of the norms the kernel gives
    middle = (norms.size - 1) // 2
    assert reduced.median_token_norm.item() == np.partition(norms, middle)[middle]
    assert reduced.max_token_norm.item() == norms.max()
    bar = max(np.float32(100), np.float32(1000) * expected['median_abs'])
    assert reduced.sun_massive.item() == np.count_nonzero(np.abs(values.contiguous().numpy()) > bar)
    return reduced


def test_resnet_conv1_at_1024_with_fewer_than_half_zeros():
    """64 x 512 x 512 (16.7M values): the histogram and the selection both run."""
    generator = torch.Generator().manual_seed(0)
    fmap = torch.relu(torch.randn(64, 512 * 512, generator=generator) + 0.3)
    assert (fmap == 0).float().mean() < 0.5
    _check(fmap)


def test_vit_tokens_at_1024_with_a_planted_column():
    """ViT-L/16 at 1024 (4096 tokens x 1024 channels, token-major memory): token column 0 of the 64 x 64 grid
    is 5.0, the rest uniform in [0, 0.01); the median is one of the small values."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.rand(4096, 1024, generator=generator) * 0.01  # (N, C)
    tokens.view(64, 64, 1024)[:, 0] = 5.0
    reduced = _check(tokens.t())
    assert float(reduced.median_abs) < 0.01


def test_a_token_map_cut_from_a_batch_with_prefix_tokens_is_read_in_place():
    """(B, P + N, C) block output without its prefix tokens, one image of the batch: strided, offset memory."""
    generator = torch.Generator().manual_seed(2)
    output = torch.randn(2, 5 + 196, 384, generator=generator)
    fmap = capture._tokens_to_map((14, 14), 5)(output)[1]  # (C, 14, 14) view
    values = fmap.reshape(384, -1)
    assert values.data_ptr() == output[1, 5].data_ptr() and not values.is_contiguous()
    _check(values)


@pytest.mark.parametrize('size', [1, 2, 7, 8, kernels._DIRECT_SELECTION, kernels._DIRECT_SELECTION + 1, 1 << 18,
                                  (1 << 18) + 1])
def test_ties_at_the_median_and_both_parities(size):
    """Half the values share one |x| (ReLU output shifted down): the answer's bin is mostly one value. Up to
    _DIRECT_SELECTION values the median is selected directly, beyond it through the histogram."""
    generator = torch.Generator().manual_seed(size)
    flat = torch.relu(torch.randn(size, generator=generator)) - 0.01
    _check(flat.reshape(1, -1))
    _check(flat.reshape(-1, 1))


@pytest.mark.parametrize('zeros_minus_rank', [-1, 0, 1])
def test_zeros_settle_the_median_exactly_at_the_boundary(zeros_minus_rank):
    count = 16385  # odd, and past the direct selection's size: the rank is 8193
    rank = (count + 1) // 2
    values = torch.arange(1, count + 1, dtype=torch.float32)
    values[:rank + zeros_minus_rank] = 0.0
    values[1::7] *= -1  # signed zeros and signed values
    reduced = _check(values[torch.randperm(count, generator=torch.Generator().manual_seed(3))].reshape(5, 3277))
    assert (float(reduced.median_abs) == 0.0) == (zeros_minus_rank >= 0)


def test_a_median_among_subnormal_values_next_to_zeros():
    """Zeros and subnormals share the lowest bin: the median there is the exact subnormal, not 0."""
    tiny = np.float32(1e-42)
    values = np.array([0.0] * 4000 + [tiny * i for i in range(1, 6001)], np.float32)  # past the direct selection
    np.random.default_rng(4).shuffle(values)
    reduced = _check(torch.from_numpy(values).reshape(4, 2500))
    assert 0 < float(reduced.median_abs) < 1e-38


@pytest.mark.parametrize('places', [(0, 63, 64, -1), (1, 127, 128, 191)])
def test_the_median_s_bin_read_at_block_edges(places):
    """The four values of the median's bin sit at the edges of the blocks the last pass skips or reads (the
    first and last value of a block, the short last block); the rest lie many bins below or above."""
    size = 64 * 200 + 13  # past the direct selection's size
    values = np.full(size, 1e3, np.float32)
    values[:size // 2 - 2] = 1e-6  # below the bin: the median is the third of the four
    middle = np.nextafter(np.float32(1.0), np.float32(2.0)) ** np.arange(4, dtype=np.float32)
    rest = np.setdiff1d(np.arange(size), np.array(places) % size)
    values = np.concatenate([values[:size // 2 - 2], values[size // 2 + 2:]])  # (size - 4,)
    np.random.default_rng(7).shuffle(values)
    planted = np.empty(size, np.float32)
    planted[rest], planted[np.array(places) % size] = values, -middle[::-1]
    reduced = _check(torch.from_numpy(planted).reshape(1, -1))
    assert float(reduced.median_abs) == sorted(middle)[2]
    _check(torch.from_numpy(planted).reshape(-1, 1))


def test_runs_of_zeros_in_a_relu_map_of_resnet_conv1_at_224():
    """ResNet50's conv1 ReLU at 224 (64 x 112 x 112), a little under half zeros, in runs that start on and off
    the histogram's blocks of 8, with signed zeros: the histogram counts every value once (blocks of zeros at
    once, the rest one by one) and the median is exact with 1, 2 and 3 runs."""
    generator = np.random.default_rng(8)
    values = np.abs(generator.standard_normal((64, 112 * 112))).astype(np.float32) + np.float32(1e-3)
    for row in values:
        starts = np.sort(generator.choice(112 * 112 - 64, 180, replace=False))
        for start, length in zip(starts, generator.integers(1, 70, starts.size)):
            row[start:start + length] = 0.0
    values[::3, ::5] *= -1  # signed zeros and signed values
    zeros = np.count_nonzero(values == 0)
    assert 0.3 < zeros / values.size < 0.5
    flat_bits = values.view(np.int32).reshape(-1)[:-3]  # a size that is not a multiple of 8
    shift = kernels._bin_shift(flat_bits.size)
    counts = np.empty((kernels._SUBHISTOGRAMS, 1 << (31 - shift)), np.int32)
    kernels._count_bins(flat_bits, shift, counts)
    expected = np.bincount((flat_bits & 0x7FFFFFFF) >> shift, minlength=counts.shape[1])
    np.testing.assert_array_equal(counts.sum(axis=0), expected)
    _check(torch.from_numpy(values))
    _check(torch.from_numpy(values).t().contiguous().t())  # token-major memory


def _median_reference(flat_bits: np.ndarray) -> int:
    """The lower median of |x| of float32 bit patterns, as a bit pattern: NumPy's selection of all of them."""
    magnitudes = flat_bits & 0x7FFFFFFF
    rank = (magnitudes.size + 1) // 2
    return int(np.partition(magnitudes, rank - 1)[rank - 1])


def _conv1_at_1024(zeros: float, seed: int) -> np.ndarray:
    """ResNet50's conv1 at 1024 as the bits of its (64 x 512 x 512) ReLU map: |N(0, 1)| with runs of exact zeros
    (either sign) making up about ``zeros`` of it, and a few negative values."""
    generator = np.random.default_rng(seed)
    values = np.abs(generator.standard_normal((64, 512 * 512), dtype=np.float32))
    values[generator.random(values.shape, dtype=np.float32) < zeros] = 0.0
    values[::5, ::7] *= -1
    return values.view(np.int32).reshape(-1)


@pytest.mark.parametrize('zeros', [0.0, 0.3, 0.499])
def test_the_median_from_its_bracket_and_from_the_histogram_equal_numpy_s_at_1024(zeros):
    """A 64 x 512 x 512 map, from no zeros to almost half (a bracket at the low end of the nonzero values), odd
    and even in size: the bracket holds the median (on AVX-512 CPUs) and both ways give NumPy's, with the map
    in 1, 2 and 3 runs (uneven on 2 cores)."""
    for flat_bits in (_conv1_at_1024(zeros, 10), _conv1_at_1024(zeros, 11)[:-7]):
        expected = _median_reference(flat_bits)
        zero_count = int(np.count_nonzero(flat_bits & 0x7FFFFFFF == 0))
        rank = (flat_bits.size + 1) // 2
        for parts in (1, 2, 3):
            assert kernels._median_bits(flat_bits, rank, zero_count, parts) == expected
            assert kernels._histogram_median(flat_bits, rank, kernels._bin_shift(flat_bits.size), parts) == expected
            if kernels._VECTOR_GATHER:
                assert kernels._bracketed_median(flat_bits, rank, zero_count, parts) == expected


@pytest.mark.skipif(not kernels._VECTOR_GATHER, reason='the bracket is gathered with AVX-512 only')
@pytest.mark.parametrize('size', [kernels._BRACKET_FROM, (1 << 18) + 13, 64 * 512 * 512 + 5])
def test_the_bracket_s_pass_counts_and_gathers_every_value_once(size):
    """Sizes that are not a multiple of the 16 values gathered at once, cut into runs: the values below the
    bracket counted and those in it gathered in memory order, as NumPy finds them, including both ends,
    infinities and NaN (whose patterns order above every number's)."""
    generator = np.random.default_rng(size)
    values = generator.standard_normal(size, dtype=np.float32)
    values[generator.integers(0, size, 50)] = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32).repeat(10)
    ends = np.array([0.5, -0.52, -0.5], np.float32)  # the bracket's ends, at the runs' outer edges
    values[:3], values[-3:] = ends, ends[::-1]
    flat_bits = values.view(np.int32)
    magnitudes = flat_bits & 0x7FFFFFFF
    low, high = np.float32(0.5).view(np.int32), np.float32(0.52).view(np.int32)
    expected = magnitudes[(magnitudes >= low) & (magnitudes <= high)]
    room = expected.size + 1024
    for parts in (1, 2, 3):
        gathered = np.empty((parts, room + 2 * kernels._GATHER_LANES), np.int32)
        found, below = np.empty(parts, np.int64), np.empty(parts, np.int64)
        kernels._gather_runs(flat_bits, low, np.int32(high - low), gathered, room, found, below)
        assert below.sum() == np.count_nonzero(magnitudes < low)
        np.testing.assert_array_equal(np.concatenate([row[:n] for row, n in zip(gathered, found)]), expected)
        assert kernels._gather(flat_bits, low, np.int32(high - low), gathered[0], expected.size - 1) == (-1, 0)


@pytest.mark.parametrize('zero_tokens', [0.45, 0.5, 0.55])
def test_the_token_norms_median_with_zero_tokens_near_half_of_a_1024_grid(zero_tokens):
    """ResNet50's conv1 grid at 1024 (512 x 512 tokens, 16 channels): whole tokens zero (a ReLU's dead places)
    just under, at and over half of them, so that the token norms' median is found in a bracket at the low
    end of the nonzero norms, or is zero; NumPy's lower median of the kernel's norms either way."""
    generator = np.random.default_rng(15)
    values = np.abs(generator.standard_normal((16, 512 * 512), dtype=np.float32))
    values[:, generator.permutation(values.shape[1])[:int(zero_tokens * values.shape[1])]] = 0.0
    reduced = _check(torch.from_numpy(values))
    assert (float(reduced.median_token_norm) == 0.0) == (zero_tokens >= 0.5)


def test_the_selection_in_the_bracket_finds_every_rank_at_its_bins_edges():
    """Bit patterns gathered in two runs, each of 2,048 patterns of the bracket once and some of them again:
    with bins of two patterns, ranks fall on the first and the last value of a bin; every rank is the sorted
    values' own, also with an open-ended bracket (high = the largest int32, bins of 2**21 patterns)."""
    low = np.int32(np.float32(0.25).view(np.int32))
    patterns = low + np.arange(2048, dtype=np.int32)
    values = np.concatenate([patterns, patterns[::3], patterns[1::7]])
    np.random.default_rng(14).shuffle(values)
    gathered = np.zeros((2, values.size), np.int32)
    found = np.array([values.size // 3, values.size - values.size // 3])
    gathered[0, :found[0]], gathered[1, :found[1]] = values[:found[0]], values[found[0]:]
    ordered = np.sort(values)
    for high in (patterns[-1], np.int32(0x7FFFFFFF)):
        for rank in range(1, values.size + 1):
            assert kernels._select_in_bracket(gathered, found, rank, low, high) == ordered[rank - 1]


@pytest.mark.skipif(not kernels._VECTOR_GATHER, reason='the bracket is gathered with AVX-512 only')
def test_where_the_bracket_misses_the_histogram_finds_the_median():
    """Two maps at 1024 where the bracket cannot serve: every sampled place planted with large values (the
    bracket lies above the median), and 60% of the values tied at one |x| (more in the bracket than its room);
    the bracket says so and the median is still NumPy's."""
    flat_bits = _conv1_at_1024(0.2, 12)
    size, rank = flat_bits.size, (flat_bits.size + 1) // 2
    window = size // kernels._sample_count(size)
    places = np.array([kernels._sampled_place(i, window) for i in range(kernels._sample_count(size))])
    planted = flat_bits.view(np.float32).copy()
    planted[places] = np.float32(1e4) + np.arange(places.size, dtype=np.float32)
    tied = flat_bits.view(np.float32).copy()
    tied[np.random.default_rng(13).random(size) < 0.6] = np.float32(-0.75)
    for values in (planted, tied):
        bits = values.view(np.int32)
        zeros = int(np.count_nonzero(values == 0))
        assert kernels._bracketed_median(bits, rank, zeros, 2) == -1
        assert kernels._median_bits(bits, rank, zeros, 2) == _median_reference(bits)
    assert planted.view(np.int32)[places].min() > _median_reference(planted.view(np.int32))


def test_a_map_of_any_grid_shape_in_either_layout_is_read_in_place():
    """A (C, H, W) map, channel-major or a (H, W, C) token grid's view: the figures of its (C, N) view, bit for
    bit, and its maxima located; a layout that is neither goes to PyTorch."""
    generator = torch.Generator().manual_seed(9)
    grid = torch.randn(28, 28, 96, generator=generator)  # (H, W, C) tokens
    for fmap in (grid.permute(2, 0, 1), grid.permute(2, 0, 1).contiguous()):  # token-, channel-major
        flat = kernels.reduce_map(fmap.reshape(96, -1), 5, SUN_BAR)
        shaped = kernels.reduce_map(fmap, 5, SUN_BAR)
        np.testing.assert_array_equal(shaped.floats.view(np.int32), flat.floats.view(np.int32))
        np.testing.assert_array_equal(shaped.ints, flat.ints)
        located = kernels.first_max_positions(fmap.numpy(), shaped.maximum, torch.tensor(-float('inf')))
        assert torch.equal(located, fmap.reshape(96, -1).argmax(dim=1))
    assert kernels.reduce_map(grid.permute(2, 0, 1)[:, :, ::2], 5, SUN_BAR) is None


@pytest.mark.skipif(not kernels._PARALLEL, reason="numba's OpenMP threading layer is not loaded")
def test_runs_follow_pytorch_s_thread_count():
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            assert kernels._parts() == threads
            assert kernels.numba.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
        kernels._parts()


def test_nan_infinities_and_signed_zeros_per_channel():
    values = torch.tensor([[1.0, float('nan'), -2.0, 0.5],
                           [-float('nan'), 3.0, -0.0, 0.0],
                           [float('inf'), -1.0, 2.0, 0.0],
                           [-0.0, -0.0, -0.0, -0.0],
                           [-float('inf'), -4.0, -5.0, -1.0]])
    one, two, three = (int(np.float32(value).view(np.uint32)) for value in (1, 2, 3))
    edge_nans = np.array([[one, 0x7F800001, two, three], [one, 0xFF800001, two, three]], np.uint32)
    values = torch.cat([values, torch.from_numpy(edge_nans.view(np.float32))])  # the NaNs next to +-inf
    reduced = kernels.reduce_map(values, 3, SUN_BAR)
    torch.testing.assert_close(reduced.maximum, values.amax(dim=1), equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(reduced.minimum, values.amin(dim=1), equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(reduced.max_abs[[0, 1, 5, 6]]).all()
    assert reduced.max_abs[2:5].tolist() == [float('inf'), 0.0, float('inf')]
    assert torch.isnan(reduced.token_norms[:2]).all() and torch.isnan(reduced.max_token_norm)  # NaN at 0 and 1
    assert reduced.median_token_norm.item() == reduced.token_norms[2:].max().item()  # NaNs rank above numbers


def test_top_activations_break_ties_by_channel_then_position():
    values = torch.zeros(6, 50)
    values[4, 7] = values[2, 30] = values[2, 9] = -6.0  # equal |x| in two channels, two positions
    values[5, 0] = 6.0
    values[1, 3] = 5.0
    reduced = _check(values, k=5)
    assert list(zip(reduced.top_channels.tolist(), reduced.top_positions.tolist())) == \
        [(2, 9), (2, 30), (4, 7), (5, 0), (1, 3)]
    fallback = stats._top_activations(values, values.abs().amax(dim=1), 5)  # PyTorch's path: the same rule
    assert [t.tolist() for t in fallback] == [reduced.top_values.tolist(), reduced.top_channels.tolist(),
                                              reduced.top_positions.tolist()]


def test_count_over_is_strict_and_never_counts_nan():
    values = torch.tensor([[100.0, -100.0, 100.00001, -250.0, float('nan'), float('inf'), -float('inf'), 3.0]])
    assert kernels.count_over(values, 100.0) == 4
    assert kernels.count_over(values.t().contiguous().t(), 100.0) == 4  # token-major memory


def test_maps_the_kernels_do_not_take_go_to_pytorch():
    assert kernels.reduce_map(torch.randn(4, 6, dtype=torch.float16), 5, SUN_BAR) is None
    assert kernels.reduce_map(torch.randn(4, 6, device='meta'), 5, SUN_BAR) is None
    neither = torch.randn(4, 6, 2)[:, :, 0]  # neither channel- nor token-major
    assert kernels.reduce_map(neither, 5, SUN_BAR) is None
    assert kernels.reduce_map(torch.randn(6), 5, SUN_BAR) is None  # no channel axis


@pytest.mark.parametrize('setting, available', [('0', False), ('1', True)])
def test_switched_off_by_the_environment(setting, available):
    """T2T_VIZ_FUSED is read when the process imports the kernels."""
    code = ('import torch; from t2t_viz import kernels; '
            'print(kernels.fused_available(), kernels.reduce_map(torch.randn(4, 6), 5, (100.0, 1000.0)) is None)')
    out = subprocess.run([sys.executable, '-c', code], env={**os.environ, 'T2T_VIZ_FUSED': setting},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == [str(available), str(not available)]


def test_switched_off_in_the_process(monkeypatch):
    monkeypatch.setattr(kernels, '_SWITCHED_OFF', True)
    assert not kernels.fused_available() and kernels.reduce_map(torch.randn(4, 6), 5, SUN_BAR) is None


@pytest.mark.parametrize('name, size', [('resnet18', 160), ('t2t_vit_7', 224)])
def test_layer_statistics_of_a_real_pass_equal_pytorch_s(name, size, monkeypatch):
    """Every layer of a real forward pass: the fused path and PyTorch's give the same figures (sums to float32
    rounding), so CPU and CUDA maps are measured alike."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    fused = capture.run(model, x, keep_maps=False, reduce=layer_stats)[0].layers
    monkeypatch.setattr(kernels, '_SWITCHED_OFF', True)
    plain = capture.run(model, x, keep_maps=False, reduce=layer_stats)[0].layers
    assert len(fused) == len(plain) > 5
    for mine, theirs in zip(fused, plain):
        for name in ('max_abs', 'minimum', 'maximum'):
            assert torch.equal(getattr(mine.stats.channels, name), getattr(theirs.stats.channels, name)), name
        for name in ('top_values', 'top_channels', 'top_positions', 'median_abs', 'sun_massive'):
            assert torch.equal(getattr(mine.stats, name), getattr(theirs.stats, name)), (mine.name, name)
        torch.testing.assert_close(mine.stats.token_norms, theirs.stats.token_norms, rtol=2e-6, atol=0)
        torch.testing.assert_close(mine.stats.channels.mean, theirs.stats.channels.mean, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('token_major', [False, True])
def test_first_max_positions_of_the_channels_that_reach_their_floor(token_major):
    """The first position of each qualifying channel's maximum, as argmax gives it (a repeated maximum,
    -0.0 beside 0.0, NaN that never qualifies); -1 for the others; the floor per channel or one for all."""
    generator = torch.Generator().manual_seed(6)
    values = torch.randn(300, 4096, generator=generator)  # (C, N) at 1024's 64 x 64 ViT grid
    values[7, [900, 30, 2000]] = 50.0  # repeated: the first, 30, counts
    values[8] = 0.0
    values[8, 100] = -0.0
    values[9, 17] = float('nan')
    if token_major:
        values = values.t().contiguous().t()
    maximum = values.amax(dim=1)
    floor = torch.full((300,), 3.5)  # about the median maximum of 4096 normal values
    floor[[7, 8, 9]] = -float('inf')
    located = kernels.first_max_positions(values.numpy(), maximum, floor)
    wanted = maximum >= floor
    assert torch.equal(located[wanted], values.argmax(dim=1)[wanted])
    assert (located[~wanted] == -1).all() and located[7] == 30 and located[8] == 0 and located[9] == -1
    assert 20 < int(wanted.sum()) < 280  # both kinds of channel are there
    everywhere = kernels.first_max_positions(values.numpy(), maximum, torch.tensor(-float('inf')))
    finite = ~torch.isnan(maximum)
    assert torch.equal(everywhere[finite], values.argmax(dim=1)[finite])


def test_cpu_features_come_from_numba_s_target_not_only_the_host(monkeypatch):
    """A cache compiled for other machines (NUMBA_CPU_NAME=generic, or explicit NUMBA_CPU_FEATURES) must not
    use the host's AVX-512 or F16C: their intrinsics would not compile there."""
    monkeypatch.setattr(kernels.numba.config, 'CPU_FEATURES', None)
    monkeypatch.setattr(kernels.numba.config, 'CPU_NAME', 'generic')
    assert not kernels._compiles_for('avx512f') and not kernels._compiles_for('f16c')
    monkeypatch.setattr(kernels.numba.config, 'CPU_FEATURES', '+sse2,+f16c,-avx512f')
    assert kernels._compiles_for('f16c') and not kernels._compiles_for('avx512f')
    monkeypatch.setattr(kernels.numba.config, 'CPU_FEATURES', None)
    monkeypatch.setattr(kernels.numba.config, 'CPU_NAME', None)
    import llvmlite.binding
    host = llvmlite.binding.get_host_cpu_features()
    assert kernels._compiles_for('avx512f') == bool(host.get('avx512f', False))


def test_kernels_compiled_for_a_generic_x86_cpu_run_without_avx512_or_f16c(tmp_path):
    """NUMBA_CPU_NAME=generic (a cache for any x86-64, and what a CPU without F16C or AVX-512 gets): every kernel
    compiles (the float16 conversion would otherwise call a runtime function numba's JIT cannot find, which
    aborts the process), the median is the histogram's, exact, PyTorch writes the whole float16 copies and
    the kernels' pooled ones are converted in integers, bit for bit as PyTorch."""
    code = """
import numpy as np, torch
from t2t_viz import kernels
print(kernels._VECTOR_GATHER, kernels._HARDWARE_FLOAT16, kernels.compile_kernels())
values = np.abs(np.random.default_rng(16).standard_normal((64, 112 * 112), dtype=np.float32))
values[:, ::3] = 0.0
rank = (values.size + 1) // 2
reduced = kernels.reduce_array(values, 5, (100.0, 1000.0), float16_copy=np.empty(values.shape, np.int16))
print(reduced.copied_float16, float(reduced.median_abs) == np.partition(values.ravel(), rank - 1)[rank - 1])
finite = np.random.default_rng(17).standard_normal(100_000, dtype=np.float32) * 1e4
converted = np.empty(finite.shape, np.uint16)
kernels._to_float16(finite, converted)  # pooled copies: the integer conversion
expected = torch.from_numpy(finite).clamp(-65504, 65504).half().view(torch.int16).numpy().view(np.uint16)
print(bool((converted == expected).all()))
"""
    env = {**os.environ, 'NUMBA_CACHE_DIR': str(tmp_path), 'NUMBA_CPU_NAME': 'generic'}
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=600)
    assert result.stdout.split() == ['False', 'False', 'True', 'False', 'True', 'True'], result.stderr[-2000:]


def test_compiling_once_fills_numba_s_cache_for_later_processes(tmp_path):
    """What `t2t-viz prepare` does at install: every kernel compiled and written to the cache on disk."""
    import subprocess
    import sys
    env = {**os.environ, 'NUMBA_CACHE_DIR': str(tmp_path)}
    code = 'from t2t_viz import kernels; print(kernels.compile_kernels())'
    result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == 'True', result.stderr[-2000:]
    cached = {path.name.split('.')[1] for path in tmp_path.rglob('kernels.*.nbi')}  # kernels.<function>-<line>.nbi
    names = {'_reduce', '_bin_shift', '_sun_count', '_channel_major', '_token_major', '_combine', '_median_bits',
             '_histogram', '_find_bin', '_collect', '_top_magnitudes', '_first_maxima', '_count_over',
             '_pool_channels', '_pool_tokens', '_channel_run', '_token_run', '_count_bins', '_pool_channel_run',
             '_pool_token_run', '_to_float16', '_store', '_run', '_collect_run', '_float16_of',
             '_histogram_median', '_bracketed_median', '_bracket', '_sample_count', '_sampled_place', '_gather_runs',
             '_gather', '_select_in_bracket'}
    assert names <= {name.rsplit('-', 1)[0] for name in cached}, cached


def test_display_pooling_of_resnet_conv1_at_1024_lands_every_value_in_its_window():
    """64 x 512 x 512 pooled to 128 x 128 (windows of 4 x 4): NumPy's mean of each window, and a planted
    spike moves exactly to its window."""
    generator = torch.Generator().manual_seed(7)
    fmap = torch.relu(torch.randn(1, 64, 512, 512, generator=generator))
    fmap[0, 5, 301, 77] = 1.0e4
    pooled = kernels.average_pool(fmap, (128, 128))
    expected = fmap.numpy().astype(np.float64).reshape(1, 64, 128, 4, 128, 4).mean(axis=(3, 5))
    np.testing.assert_allclose(pooled.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert pooled.shape == (1, 64, 128, 128) and pooled[0, 5].argmax() == 75 * 128 + 19


@pytest.mark.parametrize('shape, size', [((2, 5, 37, 23), (15, 9)), ((1, 147, 256, 256), (128, 128)),
                                         ((1, 3, 300, 451), (85, 128))])
def test_display_pooling_cuts_windows_as_adaptive_pooling_in_both_layouts(shape, size):
    """Uneven, overlapping windows, batches, and token maps cut from (B, 1 + N, C) with a class token (T2T's
    soft_split0 at 1024 is 256 x 256 tokens of 147 channels): PyTorch's adaptive pooling, to float32 rounding."""
    generator = torch.Generator().manual_seed(8)
    batch, channels, height, width = shape
    channel_major = torch.randn(shape, generator=generator)
    tokens = torch.randn(batch, 1 + height * width, channels, generator=generator)
    token_major = tokens[:, 1:].transpose(1, 2).reshape(shape)
    for fmap in (channel_major, token_major):
        pooled = kernels.average_pool(fmap, size)
        torch.testing.assert_close(pooled, torch.nn.functional.adaptive_avg_pool2d(fmap, size), rtol=1e-5,
                                   atol=2e-7)
        assert pooled.is_contiguous()
        for parts in (1, 3):  # runs of channels or output rows over threads: the same sums, bit for bit
            assert torch.equal(kernels.average_pool(fmap, size, parts=parts), pooled)


def test_display_pooling_propagates_nan_and_infinity():
    fmap = torch.ones(1, 300, 64, 64)
    fmap[0, 1, 5, 5], fmap[0, 2, 9, 0], fmap[0, 3, 0, 0] = float('nan'), float('inf'), -float('inf')
    tokens = fmap.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the same map, token-major
    for pooled in (kernels.average_pool(m, (16, 16)) for m in (fmap, tokens)):
        assert torch.isnan(pooled[0, 1, 1, 1]) and pooled[0, 2, 2, 0] == float('inf')
        assert pooled[0, 3, 0, 0] == -float('inf') and int(torch.isfinite(pooled).logical_not().sum()) == 3


def _float16_boundaries() -> np.ndarray:
    """float32 values at every place where float16 rounding can go wrong: each finite float16 value, the
    midpoints between neighbours (ties, rounded to even), the float32 values just beside each midpoint, past
    the largest finite value, float32 subnormals, both signs, infinities and NaNs."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # 0 .. 65504
    midpoints = np.concatenate([(halves[:-1] + halves[1:]) / 2, [65520.0]]).astype(np.float32)  # all exact
    values = np.concatenate([halves.astype(np.float32), midpoints, np.nextafter(midpoints, np.float32(0)),
                             np.nextafter(midpoints, np.float32(np.inf)), [65519.996, 70000.0, 3.4e38, 1e-45, 1e-39],
                             [np.inf, np.nan]]).astype(np.float32)
    payload_nan = np.array([0x7F800001, 0x7FFFFFFF], np.uint32).view(np.float32)
    return np.concatenate([values, -values, payload_nan, -payload_nan])


def test_float16_conversion_rounds_and_clamps_bit_for_bit_as_pytorch():
    """The kernels' float32 -> float16 conversion (for pooled display copies) against PyTorch's clamp and
    conversion: every tie and every value beside one, subnormals, overflow, and 4 million random patterns."""
    random_bits = np.random.default_rng(0).integers(0, 2**32, 4_000_000, dtype=np.uint64).astype(np.uint32)
    for values in (_float16_boundaries(), random_bits.view(np.float32)):
        converted = np.empty(values.shape, np.uint16)
        kernels._to_float16(values, converted)
        expected = torch.from_numpy(values).clamp(-capture.FLOAT16_MAX, capture.FLOAT16_MAX).half().numpy()
        nan = np.isnan(expected)
        np.testing.assert_array_equal(np.isnan(converted.view(np.float16)), nan)
        np.testing.assert_array_equal(converted[~nan], expected.view(np.uint16)[~nan])


@pytest.mark.skipif(not kernels._HARDWARE_FLOAT16, reason='the CPU does not convert to float16 itself')
@pytest.mark.parametrize('parts', [1, 2])
def test_the_reduction_writes_the_float16_copy_bit_for_bit_as_pytorch_and_its_figures_do_not_change(parts):
    """ResNet50's conv1 map at 224 (64 x 112 x 112) holding every float16 rounding boundary and random bit
    patterns (NaNs and infinities among them), reduced with its float16 copy written in the same read: the
    copy is PyTorch's clamp and conversion, bit for bit, and every figure is the one the reduction gives
    without a copy. A token-major map's copy is left to PyTorch, untouched."""
    boundaries = _float16_boundaries()
    random_bits = np.random.default_rng(1).integers(0, 2**32, 64 * 112 * 112, dtype=np.uint64).astype(np.uint32)
    values = random_bits.view(np.float32)
    values[:boundaries.shape[0]] = boundaries
    array = values.reshape(64, 112, 112)
    copy = np.full(array.shape, 0x5555, np.int16)
    bounds = np.array([1e-6, 1e-5, 100.0, 2.0])
    fused = kernels.reduce_array(array, 5, SUN_BAR, parts, bounds, float16_copy=copy)
    plain = kernels.reduce_array(array, 5, SUN_BAR, parts, bounds)
    assert fused.copied_float16 and not plain.copied_float16
    expected = torch.from_numpy(array).clamp(-capture.FLOAT16_MAX, capture.FLOAT16_MAX).half().numpy()
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(copy.view(np.float16)), nan)
    np.testing.assert_array_equal(copy[~nan], expected.view(np.int16)[~nan])
    np.testing.assert_array_equal(fused.floats, plain.floats)
    np.testing.assert_array_equal(fused.ints, plain.ints)
    assert fused.flag_lists() == plain.flag_lists()
    tokens = np.ascontiguousarray(array.reshape(64, -1).T).T.reshape(array.shape)  # the same map, token-major
    untouched = np.full(array.shape, 0x5555, np.int16)
    token_major = kernels.reduce_array(tokens, 5, SUN_BAR, parts, bounds, float16_copy=untouched)
    assert not token_major.copied_float16 and (untouched == 0x5555).all()
    np.testing.assert_array_equal(token_major.array('median_abs'), fused.array('median_abs'))


@pytest.mark.parametrize('layout', ['channel_major', 'token_major'])
def test_display_pooling_into_float16_is_the_float32_pooling_clamped_and_converted(layout):
    """ResNet conv1 at 1024 (64 x 512 x 512 to 128 x 128) pooled straight into a float16 copy: bit for bit the
    float32 pooling, clamped to float16's range and converted by PyTorch; windows of huge values, infinities,
    NaNs and averages too small for a normal float16 included."""
    generator = torch.Generator().manual_seed(9)
    fmap = torch.relu(torch.randn(1, 64, 512, 512, generator=generator))
    fmap[0, 1, :4, :4] = 1e6  # a window whose average is beyond float16's range
    fmap[0, 2, 4, 4], fmap[0, 3, 8, 8], fmap[0, 4, 12, 12] = float('inf'), -float('inf'), float('nan')
    fmap[0, 5] *= 1e-6  # averages around float16's smallest normal value, 6e-5, and below
    if layout == 'token_major':
        fmap = fmap.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    half = torch.empty(1, 64, 128, 128, dtype=torch.float16)
    assert kernels.average_pool(fmap, (128, 128), out=half) is half
    expected = kernels.average_pool(fmap, (128, 128)).clamp(-capture.FLOAT16_MAX, capture.FLOAT16_MAX).half()
    assert torch.equal(torch.isnan(half), torch.isnan(expected)) and int(torch.isnan(half).sum()) == 1
    assert torch.equal(half.nan_to_num(), expected.nan_to_num())
    assert half[0, 1, 0, 0] == capture.FLOAT16_MAX and half[0, 3, 2, 2] == -capture.FLOAT16_MAX
    assert bool(((half[0, 5] > 0) & (half[0, 5] < 6.1e-5)).any())  # subnormal float16 averages
    with pytest.raises(ValueError, match='cannot pool'):
        kernels.average_pool(fmap, (128, 128), out=torch.empty(1, 64, 128, 64, dtype=torch.float16))


def test_display_pooling_leaves_maps_it_cannot_take_to_pytorch():
    assert kernels.average_pool(torch.randn(1, 4, 8, 8, dtype=torch.float16), (4, 4)) is None
    assert kernels.average_pool(torch.randn(1, 4, 8, 8, device='meta'), (4, 4)) is None
    assert kernels.average_pool(torch.randn(1, 4, 8, 16)[..., ::2], (4, 4)) is None  # strided columns


def test_a_capture_keeps_display_copies_pooled_by_the_kernel():
    torch.manual_seed(0)
    model = timm.create_model('resnet18', pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 512, 512)
    full = capture.run(model, x)[0]
    kept = capture.run(model, x, dtype=torch.float16, max_side=64)[0]
    assert [layer.name for layer in kept.layers] == [layer.name for layer in full.layers]
    pooled = [layer for layer in kept.layers if layer.pooled]
    assert len(pooled) >= 5
    for layer in pooled:
        expected = torch.nn.functional.adaptive_avg_pool2d(full.layer(layer.name).fmap[None], layer.fmap.shape[-2:])
        torch.testing.assert_close(layer.fmap.float(), expected[0].half().float(), rtol=1e-3, atol=1e-3)


_LAYER_STARTED_BEFORE = r'''
import numba, numpy as np
numba.config.THREADING_LAYER = 'workqueue'

@numba.njit(parallel=True)
def fill(values):
    for i in numba.prange(values.shape[0]):
        values[i] = i

fill(np.zeros(4))  # the process starts numba's workqueue threads before t2t_viz is imported
numba.config.THREADING_LAYER = 'default'  # and leaves no trace of it in the configuration
from t2t_viz import kernels, stats
import torch
values = torch.relu(torch.randn(64, 1000))
reduced = kernels.reduce_map(values, 3, (100.0, 1000.0))
exact = float(values.abs().flatten().kthvalue(32000).values)
print(kernels._PARALLEL, numba.threading_layer(), float(reduced.median_abs) == exact)
'''


def test_kernels_run_on_one_thread_when_the_process_started_another_threading_layer():
    """numba's workqueue layer, started by other code first, cannot take two sessions' calls at once: the
    kernels then keep to the calling thread, with the same figures."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, '-c', _LAYER_STARTED_BEFORE], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.split() == ['False', 'workqueue', 'True'], result.stderr[-2000:]


@pytest.mark.parametrize('channels', [1, 7, 2048])
def test_flag_ids_equal_numpy_flags(channels):
    """One kernel call gives the dead, flat and massive ids and the high-norm count that NumPy's definition
    gives, on figures planted with dead, flat, massive, NaN and infinite channels, and ties at every bar."""
    rng = np.random.default_rng(channels)
    for trial in range(300):
        thresholds = stats.Thresholds(dead_atol=float(rng.choice([1e-6, 0.01])),
                                      flat_atol=float(rng.choice([1e-6, 0.25])),
                                      massive_factor=float(rng.choice([100.0, 2.0])))
        max_abs = (rng.random(channels) * rng.choice([1e-7, 1.0, 100.0], channels)).astype(np.float32)
        max_abs[rng.random(channels) < 0.3] = 0.0
        max_abs[rng.random(channels) < 0.05] *= np.float32(1e4)
        minimum = (max_abs * rng.choice([0.0, 0.5, 1 - 1e-7, 1.0], channels)).astype(np.float32)
        maximum = max_abs.copy()
        tie = rng.integers(channels)
        if trial % 4 == 0:  # exactly the dead bar: dead
            max_abs[tie] = maximum[tie] = np.float32(thresholds.dead_atol)
        elif trial % 4 == 1 and thresholds.flat_atol == 0.25:  # a spread of exactly 0.25 x 2: flat
            max_abs[tie], maximum[tie], minimum[tie] = 2.0, 2.0, 1.5
        elif trial % 4 == 2:  # NaN: never flat, even beside a zero spread; never massive
            max_abs[tie], maximum[tie], minimum[tie] = np.nan, 1.0, 1.0
        elif trial % 8 == 3:
            max_abs[tie] = maximum[tie] = np.inf
        if trial % 5 == 0:  # exactly factor x the live median: not massive
            live = np.sort(max_abs[max_abs > np.float32(thresholds.dead_atol)])
            if live.size > 2:
                other = (tie + 1) % channels
                max_abs[other] = maximum[other] = np.float32(thresholds.massive_factor) * live[(live.size - 1) // 2]
        norms = rng.random(3136).astype(np.float32)
        bar = float(norms[rng.integers(norms.size)])  # ties with one norm: not over it
        with np.errstate(invalid='ignore'):
            expected = stats._channel_flags(max_abs, minimum, maximum, thresholds)
        dead, flat, massive, high_norm = kernels.flag_ids(max_abs, minimum, maximum, thresholds, norms, bar)
        assert dead == np.flatnonzero(expected['dead']).tolist()
        assert flat == np.flatnonzero(expected['flat']).tolist()
        assert massive == np.flatnonzero(expected['massive']).tolist()
        assert high_norm == np.count_nonzero(norms > np.float32(bar)) < norms.size
