"""Statistics checked against plain NumPy on planted maps, at the sizes the paper's figures use (1024, 2048)."""
import csv
import io
import math

import numpy as np
import pytest
import timm
import torch

from t2t_viz import capture
from t2t_viz.capture import Layer
from t2t_viz.stats import (CSV_COLUMNS, PREFIX_COLUMNS, ChannelStats, LayerStats, StatisticsReduce, Thresholds,
                           csv_text, kth_smallest_abs, layer_stats, summarize)

pytestmark = pytest.mark.usefixtures('statistics_backend')  # every test with the fused kernels and with PyTorch


def _lower_median_abs(values: np.ndarray) -> float:
    """The ceil(n/2)-th smallest |x|, by NumPy's partition: the definition the README gives."""
    flat = np.abs(values.ravel())
    rank = (flat.size + 1) // 2
    return float(np.partition(flat, rank - 1)[rank - 1])


def _column_planted(shape, seed=0) -> torch.Tensor:
    """Token column 0 is 5.0 in every channel and row; the rest is uniform in [0, 0.01)."""
    generator = torch.Generator().manual_seed(seed)
    fmap = torch.rand(shape, generator=generator) * 0.01
    fmap[..., 0] = 5.0
    return fmap


@pytest.mark.parametrize('shape', [(1024, 64, 64),  # ViT-L/16 at 1024: 4M values, 64 tokens a row
                                   pytest.param((64, 512, 512), marks=pytest.mark.large),  # ResNet50 conv1 at 1024
                                   pytest.param((256, 256, 256), marks=pytest.mark.large)])  # its conv2-4 at 1024
def test_median_is_exact_where_a_strided_sample_reads_one_column(shape):
    fmap = _column_planted(shape)
    summary = summarize(Layer('x', 'block', 0, fmap))
    expected = _lower_median_abs(fmap.numpy())
    assert expected < 0.006  # one value in 64 (or 512) is 5.0: the median is far below it
    assert summary.median_abs == expected
    assert summary.max_abs_ratio == pytest.approx(5.0 / expected)
    assert summary.sun_massive == 0  # 5.0 is under the absolute bar of 100


def test_median_of_signed_values_ties_and_both_parities():
    generator = torch.Generator().manual_seed(1)
    cases = [
        torch.randn(3, 101, 333, generator=generator),  # odd count, both signs
        torch.randn(2, 128, 256, generator=generator) * 1e-3,  # even count: the lower middle value
        torch.randint(-2, 3, (8, 200, 200), generator=generator).float(),  # five values, ties everywhere
        torch.zeros(4, 100, 100),  # all dead
    ]
    spread = torch.rand(2, 300, 300, generator=generator)  # 41% zeros: the median sits just above a tie run
    spread[spread < 0.41] = 0
    cases.append(spread)
    for fmap in cases:
        assert float(layer_stats(fmap).median_abs) == _lower_median_abs(fmap.numpy())


def test_any_rank_is_exact_and_the_sample_only_changes_speed():
    values = torch.randn(3_000_001, generator=torch.Generator().manual_seed(2))
    ordered = np.sort(np.abs(values.numpy()))
    for rank in (1, 2, 17, 1_500_001, 2_999_999, 3_000_001):
        assert float(kth_smallest_abs(values, rank)) == ordered[rank - 1]
    with pytest.raises(ValueError, match='rank 0'):
        kth_smallest_abs(values, 0)


def test_a_mostly_zero_relu_map_has_median_zero_and_an_infinite_ratio():
    fmap = torch.zeros(64, 512, 512)
    fmap[:, ::2, :] = torch.rand(64, 256, 512) + 0.5  # half of the values positive: the lower median is 0
    summary = summarize(Layer('act', 'relu', 0, fmap))
    assert summary.median_abs == 0.0 == _lower_median_abs(fmap.numpy())
    assert math.isinf(summary.max_abs_ratio)
    fmap[:, 1, 0] = 1.0  # one more positive value than zeros: the median is the smallest positive value
    assert summarize(Layer('act', 'relu', 0, fmap)).median_abs == _lower_median_abs(fmap.numpy()) > 0


def test_massive_reference_is_the_median_of_live_channels():
    fmap = torch.zeros(8, 16, 16)
    fmap[5:] = torch.rand(3, 16, 16) + 0.5  # 5 dead channels, 3 ordinary ones
    assert summarize(Layer('x', 'relu', 0, fmap)).massive_ids == []
    fmap[7, 3, 3] = 1e4  # far over 100x the median of the live channels' max |x|
    summary = summarize(Layer('x', 'relu', 0, fmap))
    assert summary.massive_ids == [7] and summary.dead_ids == [0, 1, 2, 3, 4]
    largest = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.5, 150.0])  # the live channels' median is 1.5
    stats = ChannelStats(max_abs=largest, mean=torch.zeros(6), minimum=torch.zeros(6), maximum=largest)
    assert stats.flags(Thresholds(massive_factor=99.9))['massive'].tolist() == [False] * 5 + [True]
    assert stats.flags(Thresholds(massive_factor=100))['massive'].tolist() == [False] * 6  # not over 100x
    assert not ChannelStats(*(torch.zeros(3),) * 4).flags()['massive'].any()  # all dead: nothing massive


def test_channel_statistics_equal_numpy():
    fmap = torch.randn(32, 40, 24, generator=torch.Generator().manual_seed(3))
    stats = layer_stats(fmap)
    values = fmap.numpy().reshape(32, -1).astype(np.float64)
    np.testing.assert_allclose(stats.channels.mean.numpy(), values.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats.channels.maximum.numpy(), values.max(1).astype(np.float32))
    np.testing.assert_array_equal(stats.channels.minimum.numpy(), values.min(1).astype(np.float32))
    np.testing.assert_array_equal(stats.channels.max_abs.numpy(), np.abs(values).max(1).astype(np.float32))
    np.testing.assert_allclose(stats.token_norms.numpy(), np.sqrt((fmap.numpy().astype(np.float64) ** 2).sum(0)),
                               rtol=1e-6)
    order = np.argsort(-np.abs(values).ravel(), kind='stable')[:5]
    assert stats.top_channels.tolist() == (order // values.shape[1]).tolist()
    assert stats.top_positions.tolist() == (order % values.shape[1]).tolist()
    assert stats.top_values.tolist() == values.ravel()[order].astype(np.float32).tolist()


def test_sun_count_against_numpy():
    fmap = torch.rand(16, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    fmap[3, 5, 5], fmap[9, 1, 2], fmap[9, 2, 2] = 2000.0, -600.0, 400.0  # 1000x the median of ~0.5 is ~500
    summary = summarize(Layer('x', 'block', 0, fmap))
    bar = max(100.0, 1000.0 * _lower_median_abs(fmap.numpy()))
    assert summary.sun_massive == int((np.abs(fmap.numpy()) > bar).sum()) == 2


def _vit_with_prefix(reg_tokens: int = 0, **kwargs):
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', reg_tokens=reg_tokens, **kwargs).eval()


@pytest.mark.parametrize('name, options, prefix', [
    ('vit_tiny_patch16_224', dict(reg_tokens=4), 5),  # class token and four registers
    ('deit_tiny_distilled_patch16_224', dict(), 2),  # class and distillation tokens
    ('t2t_vit_7', dict(), 1),
])
def test_prefix_tokens_are_measured_beside_the_grid(name, options, prefix, cloned_outputs):
    torch.manual_seed(0)
    model = timm.create_model(name, **options).eval()
    with torch.no_grad():
        model.cls_token[0, 0, 17] = 1e4  # a massive activation in the class token of every block's output
    x = torch.randn(1, 3, 224, 224)
    layers = ['block 2', 'block 5']
    result = capture.run(model, x, layers=layers, reduce=layer_stats)[0]
    reference = cloned_outputs(model, x, ['blocks.1', 'blocks.4'])
    for layer, module in zip(result.layers, ('blocks.1', 'blocks.4')):
        summary = summarize(layer)
        tokens = reference[module][0].numpy().astype(np.float64)  # (N, C) with the prefix tokens first
        prefix_tokens, grid = tokens[:prefix], tokens[prefix:]
        assert layer.fmap.shape == (tokens.shape[1], 14, 14)  # the map is the patch grid alone
        np.testing.assert_allclose(layer.fmap.numpy().reshape(tokens.shape[1], -1).T, grid, rtol=1e-6, atol=1e-6)
        assert len(summary.prefix) == prefix
        np.testing.assert_allclose([t.norm for t in summary.prefix], np.linalg.norm(prefix_tokens, axis=1),
                                   rtol=1e-5)
        np.testing.assert_allclose([t.max_abs for t in summary.prefix], np.abs(prefix_tokens).max(1), rtol=1e-6)
        largest = summary.prefix_largest
        assert (largest.index, largest.max_abs_channel) == (0, 17) and largest.max_abs > 5000
        bar = max(100.0, 1000.0 * _lower_median_abs(grid))
        assert summary.median_abs == pytest.approx(_lower_median_abs(grid), rel=1e-6)
        assert sum(t.sun_massive for t in summary.prefix) == int((np.abs(prefix_tokens) > bar).sum()) >= 1
        assert summary.sun_massive == int((np.abs(grid) > bar).sum())
        median_norm = np.median(np.linalg.norm(grid, axis=1))  # 196 tokens: an even count
        assert [t.high_norm for t in summary.prefix] == list(np.linalg.norm(prefix_tokens, axis=1) > 4 * median_norm)
        row = next(csv.DictReader(io.StringIO(csv_text([summary.row('cat.png', name, 'random')]))))
        assert row['prefix_tokens'] == str(prefix) and row['prefix_max_abs_token'] == '0'
        assert row['prefix_max_abs_channel'] == '17'
        assert float(row['prefix_max_abs']) == pytest.approx(largest.max_abs, rel=1e-5)
        assert float(row['prefix_max_abs_ratio']) == pytest.approx(largest.max_abs / summary.median_abs, rel=1e-5)
        assert len(row['prefix_norms'].split(';')) == prefix


def test_layers_without_prefix_tokens_leave_the_columns_empty():
    row = summarize(Layer('act1', 'stem', 0, torch.rand(4, 8, 8))).row('a.png', 'resnet18', 'random')
    assert tuple(row) == CSV_COLUMNS and CSV_COLUMNS[-len(PREFIX_COLUMNS):] == PREFIX_COLUMNS
    assert row['prefix_tokens'] == 0 and all(row[c] == '' for c in PREFIX_COLUMNS[1:])


def test_statistics_run_shape_only_on_the_meta_device():
    fmap = torch.empty(64, 512, 512, device='meta')
    stats = layer_stats(fmap, torch.empty(1, 64, device='meta'))
    assert stats.median_abs.is_meta and stats.token_norms.shape == (512, 512) and stats.prefix.norms.shape == (1,)


def test_flag_boundaries_dead_and_flat():
    """dead: max |x| <= dead_atol (equal counts); flat: a live constant, spread <= flat_atol x max(1, max |x|)."""
    # channels: 0 all zero, 1 at exactly dead_atol, 2 constant 3.0, 3 spread of exactly flat_atol at |x| < 1,
    # 4 spread of exactly flat_atol x 4 at |x| = 4, 5 a spread just over that, 6 ordinary
    largest = np.array([0.0, 1e-6, 3.0, 0.5, 4.0, 4.0, 2.0], dtype=np.float32)
    smallest = np.array([0.0, 1e-6, 3.0, 0.5, 4.0, 4.0, -1.0], dtype=np.float32)
    smallest[3] = np.float32(0.5) - np.float32(0.25)  # spread 0.25
    smallest[4] = np.float32(4.0) - np.float32(1.0)  # spread 1.0 = 0.25 x 4
    smallest[5] = np.nextafter(np.float32(3.0), np.float32(0))  # spread just over 1.0
    stats = ChannelStats(max_abs=torch.from_numpy(np.maximum(largest, -smallest)), mean=torch.zeros(7),
                         minimum=torch.from_numpy(smallest), maximum=torch.from_numpy(largest))
    flags = stats.flags(Thresholds(dead_atol=1e-6, flat_atol=0.25))
    assert np.flatnonzero(flags['dead']).tolist() == [0, 1]
    assert np.flatnonzero(flags['flat']).tolist() == [2, 3, 4]  # never a dead channel; 5 is just over
    assert not flags['massive'].any()
    strict = stats.flags(Thresholds(dead_atol=1e-7, flat_atol=0.25))
    assert np.flatnonzero(strict['dead']).tolist() == [0] and 1 in np.flatnonzero(strict['flat'])


def test_every_csv_column_against_numpy():
    """One layer with dead, flat and massive channels and two prefix tokens; every column computed apart."""
    generator = torch.Generator().manual_seed(5)
    fmap = torch.rand(6, 5, 8, generator=generator) * 2 - 1  # (C, H, W), |x| < 1
    fmap[0] = 0.0  # dead
    fmap[1] = 0.75  # flat
    fmap[2, 4, 3] = 2500.0  # massive, and over Sun et al.'s bar (1000 x a median near 0.5)
    fmap[3, 1, 6] = -1800.0  # over the bar too, negative
    prefix = torch.rand(2, 6, generator=generator)
    prefix[1, 4] = -9000.0  # a register token with a massive activation
    layer = Layer('blocks.3', 'block', 4, None, 'block 5', shape=(6, 5, 8), stats=layer_stats(fmap, prefix))
    row = summarize(layer, Thresholds(massive_factor=50.0, high_norm_factor=3.0)).row('a.png', 'vit', 'trained')

    values = fmap.numpy().astype(np.float64)
    flat = values.reshape(6, -1)
    largest = np.abs(flat).max(1)
    dead = largest <= 1e-6
    flat_ids = [c for c in range(6) if not dead[c] and flat[c].max() - flat[c].min() <= 1e-6 * max(1.0, largest[c])]
    live_median = np.sort(largest[~dead])[(np.count_nonzero(~dead) - 1) // 2]
    massive = [c for c in range(6) if not dead[c] and largest[c] > 50 * live_median]
    median = _lower_median_abs(values)
    bar = max(100.0, 1000.0 * median)
    norms = np.sqrt((values ** 2).sum(0)).ravel()  # (40,) token norms
    median_norm = np.sort(norms)[(norms.size - 1) // 2]
    prefix_values = prefix.numpy().astype(np.float64)
    prefix_norms = np.linalg.norm(prefix_values, axis=1)
    expected = {
        'image': 'a.png', 'model': 'vit', 'weights': 'trained', 'layer': 'blocks.3', 'kind': 'block', 'depth': 4,
        'height': 5, 'width': 8, 'tokens': 40, 'channels': 6, 'dead': 1, 'dead_fraction': f'{1 / 6:.6g}',
        'flat': len(flat_ids), 'massive': len(massive), 'dead_ids': '0', 'massive_ids': ';'.join(map(str, massive)),
        'label': 'block 5', 'flat_fraction': f'{len(flat_ids) / 6:.6g}', 'massive_fraction': f'{len(massive) / 6:.6g}',
        'flat_ids': ';'.join(map(str, flat_ids)), 'procedure': 'real_forward', 'max_abs': '2500',
        'max_abs_channel': 2, 'max_abs_row': 4, 'max_abs_col': 3, 'median_abs': f'{median:.6g}',
        'max_abs_ratio': f'{2500 / median:.6g}', 'sun_massive': int((np.abs(values) > bar).sum()),
        'median_token_norm': f'{median_norm:.6g}', 'max_token_norm': f'{norms.max():.6g}',
        'high_norm_tokens': int((norms > 3 * median_norm).sum()),
        'high_norm_fraction': f'{(norms > 3 * median_norm).sum() / 40:.6g}',
        'prefix_tokens': 2, 'prefix_max_abs': '9000', 'prefix_max_abs_token': 1, 'prefix_max_abs_channel': 4,
        'prefix_max_abs_ratio': f'{9000 / median:.6g}', 'prefix_sun_massive': 1,
        'prefix_norms': ';'.join(f'{n:.6g}' for n in prefix_norms),
        'prefix_high_norm_tokens': int((prefix_norms > 3 * median_norm).sum()),
    }
    assert flat_ids == [1] and massive == [2, 3] and expected['sun_massive'] == 2
    assert row == expected
    assert tuple(row) == CSV_COLUMNS


def test_bars_are_strict_and_ratios_without_a_median():
    fmap = torch.full((2, 3, 4), 0.05)
    fmap[0, 0, 0] = 100.0  # exactly the bar max(100, 1000 x 0.05): not over it
    fmap[1, 2, 3] = -100.5  # over it
    prefix = torch.tensor([[100.0, -50.0], [-101.0, 100.5]])  # one token at the bar, one over it twice
    summary = summarize(Layer('x', 'block', 0, None, 'x', shape=(2, 3, 4), stats=layer_stats(fmap, prefix)))
    assert summary.sun_massive == 1 and [t.sun_massive for t in summary.prefix] == [0, 2]
    dead = summarize(Layer('x', 'relu', 0, torch.zeros(3, 4, 4)))
    assert dead.max_abs_ratio == 0.0 and dead.median_abs == 0.0  # nothing over a zero median
    small = torch.zeros(3, 4, 4)
    small[0, 0, 0] = 0.5
    assert math.isinf(summarize(Layer('x', 'relu', 0, small)).max_abs_ratio)  # 0.5 over a median of 0
    assert layer_stats(fmap, torch.empty(0, 2)).prefix is None  # a model without prefix tokens


def test_high_norm_mask_is_strictly_over_the_factor():
    fmap = torch.zeros(1, 2, 2)
    fmap[0] = torch.tensor([[1.0, 1.0], [1.0, 4.0]])  # norms 1, 1, 1, 4; median 1
    summary = summarize(Layer('x', 'block', 0, fmap), Thresholds(high_norm_factor=4.0))
    assert summary.high_norm_tokens == 0 and not summary.high_norm_mask().any()  # 4 is not over 4 x 1
    lower = summarize(Layer('x', 'block', 0, fmap), Thresholds(high_norm_factor=3.9))
    assert lower.high_norm_tokens == 1 and lower.high_norm_mask().tolist() == [[False, False], [False, True]]
    assert lower.high_norm_factor == 3.9


def test_flat_bar_is_flat_atol_times_max_abs_between_one_and_two():
    largest = np.array([1.5, 1.5], dtype=np.float32)  # the bar is 0.25 x 1.5 = 0.375, not 0.25 x 2
    smallest = np.array([1.5 - 0.375, 1.5 - 0.45], dtype=np.float32)
    stats = ChannelStats(max_abs=torch.from_numpy(largest), mean=torch.zeros(2), minimum=torch.from_numpy(smallest),
                         maximum=torch.from_numpy(largest))
    flags = stats.flags(Thresholds(flat_atol=0.25))
    assert flags['flat'].tolist() == [True, False]
    dead = ChannelStats(*(torch.zeros(4),) * 4).flags()
    assert dead['massive'].dtype == bool and dead['massive'].shape == (4,)


def test_negative_values_exactly_at_the_bar_are_not_counted_and_prefix_counts_are_integers():
    fmap = torch.full((2, 3, 4), 0.05)
    fmap[0, 0, 0] = -100.0  # exactly minus the bar: not over it
    fmap[1, 1, 1] = 250.0  # over it
    prefix = torch.tensor([[1.0, -2.0], [0.5, 0.25]])  # under the bar
    stats = layer_stats(fmap, prefix)
    assert int(stats.sun_massive) == 1
    assert stats.prefix.sun_massive.tolist() == [0, 0] and stats.prefix.sun_massive.dtype == torch.long
    row = summarize(Layer('x', 'block', 0, None, 'x', shape=(2, 3, 4), stats=stats)).row('a', 'm', 'w')
    assert row['prefix_sun_massive'] == 0 and str(row['prefix_sun_massive']) == '0'


def test_row_of_a_layer_with_several_ids_and_of_one_without_values():
    from t2t_viz.stats import LayerSummary
    def nothing_reduced(height: int, width: int) -> LayerStats:
        none = torch.zeros(0)
        return LayerStats(ChannelStats(none, none, none, none), torch.zeros(height, width), none, none.long(),
                          none.long(), torch.tensor(0.0), torch.tensor(0), torch.tensor(0.0), torch.tensor(0.0))

    summary = LayerSummary('x', 'x', 'relu', 0, 2, 2, 8, dead_ids=[1, 5], flat_ids=[4, 6], massive_ids=[2, 3],
                           reduced=nothing_reduced(2, 2))
    row = summary.row('a.png', 'm', 'random')
    assert (row['dead_ids'], row['flat_ids'], row['massive_ids']) == ('1;5', '4;6', '2;3')
    assert (row['max_abs'], row['max_abs_channel'], row['max_abs_row'], row['max_abs_col']) == ('0', -1, -1, -1)
    nothing = LayerSummary('y', 'y', 'relu', 0, 0, 0, 0, [], [], [], nothing_reduced(0, 0))
    row = nothing.row('a.png', 'm', 'random')
    assert (row['dead_fraction'], row['flat_fraction'], row['massive_fraction'], row['high_norm_fraction']) == \
        ('0', '0', '0', '0')
    assert csv_text([row]).splitlines()[0] == ','.join(CSV_COLUMNS)


def _misleading_bounds(strategies):
    """A replacement for the sample's bracket that misleads the search in turn (then gives the true one)."""
    from t2t_viz import stats
    real, calls = stats._narrowing_bounds, []

    def bounds(candidates, rank, round_):
        calls.append(round_)
        strategy = strategies[len(calls) - 1] if len(calls) <= len(strategies) else None
        ordered = candidates.sort().values
        if strategy == 'above':  # the whole bracket over the answer
            return int(ordered[-2]), int(ordered[-1])
        if strategy == 'below':  # the whole bracket under it
            return int(ordered[0]), int(ordered[min(len(ordered) - 1, rank // 4)])
        if strategy == 'at':  # a bracket of one value: the answer's own
            value = int(ordered[rank - 1])
            return value, value
        if strategy == 'wide':  # everything
            return int(ordered[0]), int(ordered[-1])
        if strategy == 'next':  # starts just past the answer: exactly `rank` values below it
            return int(ordered[min(rank, len(ordered) - 1)]), int(ordered[-1])
        if strategy == 'previous':  # ends just before the answer: exactly `rank - 1` values up to it
            return int(ordered[0]), int(ordered[max(0, rank - 2)])
        return real(candidates, rank, round_)
    return bounds, calls


@pytest.mark.parametrize('strategies', [['above'], ['below'], ['above', 'below'], ['at'], ['wide'],
                                        ['below', 'below', 'above'], ['next'], ['previous'], ['next', 'previous']])
def test_the_median_is_exact_whatever_bracket_the_sample_suggests(monkeypatch, strategies, statistics_backend):
    from t2t_viz import stats
    if statistics_backend == 'fused':
        pytest.skip("the sample narrows only PyTorch's search; the fused kernels count every value")
    generator = torch.Generator().manual_seed(7)
    signed = torch.randn(4, 120, 150, generator=generator)
    mostly_zero = signed.clone()
    mostly_zero[mostly_zero.abs() < 0.9] = 0  # 63% zeros, both signs: a signed map whose median is 0
    ties = torch.randint(-3, 4, (4, 120, 150), generator=generator).float() * 0.5  # 7 values, long tie runs
    almost_zero = torch.zeros(4, 120, 150)
    almost_zero[0, :, :100] = torch.rand(120, 100, generator=generator) - 2  # 8% negative, the rest zero
    for fmap in (signed, mostly_zero, ties, almost_zero):
        bounds, calls = _misleading_bounds(strategies)
        monkeypatch.setattr(stats, '_narrowing_bounds', bounds)
        expected = _lower_median_abs(fmap.numpy())
        assert float(layer_stats(fmap).median_abs) == expected, (strategies, fmap.abs().mean())
        for rank in (1, 5000, 36_000, 71_999, 72_000):
            bounds, calls = _misleading_bounds(strategies)
            monkeypatch.setattr(stats, '_narrowing_bounds', bounds)
            ordered = np.sort(np.abs(fmap.numpy().ravel()))
            assert float(kth_smallest_abs(fmap, rank)) == ordered[rank - 1], (strategies, rank)


def test_csv_lines_end_in_newline_only_and_take_their_columns():
    from t2t_viz.stats import PER_CHANNEL_COLUMNS
    row = dict.fromkeys(PER_CHANNEL_COLUMNS, 1)
    text = csv_text([row, row], PER_CHANNEL_COLUMNS)
    assert '\r' not in text and text.splitlines()[0] == ','.join(PER_CHANNEL_COLUMNS) and text.count('\n') == 3


def test_a_prefix_token_exactly_at_the_high_norm_bar_is_not_high_norm():
    fmap = torch.ones(1, 2, 2)  # every grid token's norm is 1: the median is 1
    prefix = torch.tensor([[4.0], [4.5]])  # norms 4 (at the bar 4 x 1) and 4.5 (over it)
    summary = summarize(Layer('x', 'block', 0, fmap, stats=layer_stats(fmap, prefix)))
    assert [token.high_norm for token in summary.prefix] == [False, True]
    assert summarize(Layer('x', 'block', 0, fmap)).prefix == []


@pytest.mark.parametrize('token_major', [False, True])
def test_channel_maxima_are_located_where_they_reach_the_floor_at_1024(token_major):
    """ViT-L/16 at 1024 (1024 channels x 64 x 64 tokens), as (C, H, W) or as a view of (N, C) tokens."""
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(1024, 64 * 64, generator=generator)  # (C, N)
    planted = torch.randint(0, 64 * 64, (1024,), generator=generator)
    values[torch.arange(1024), planted] = 2.0 + torch.arange(1024) / 1024
    fmap = (values.t().contiguous().t() if token_major else values).reshape(1024, 64, 64)
    assert fmap.is_contiguous() != token_major
    floor = torch.full((1024,), 2.75)
    located = layer_stats(fmap, position_floor=floor).max_positions
    reaching = torch.from_numpy(values.numpy().max(axis=1) >= 2.75)
    assert reaching.sum() == 256
    assert torch.equal(located[reaching], planted[reaching]) and (located[~reaching] == -1).all()
    assert layer_stats(fmap).max_positions is None


def _numpy_flags(values: np.ndarray, thresholds: Thresholds):
    """dead, flat and massive channel ids and high-norm tokens of a (C, N) float32 map, in NumPy (float32
    comparisons, as the Statistics section of the README defines them)."""
    largest = np.abs(values).max(1)
    dead = largest <= np.float32(thresholds.dead_atol)
    spread = values.max(1) - values.min(1)
    flat = ~dead & (spread <= np.float32(thresholds.flat_atol) * np.maximum(largest, np.float32(1)))
    live = np.sort(largest[~dead])
    massive = ~dead & (largest > np.float32(thresholds.massive_factor) * live[(live.size - 1) // 2])
    norms = np.sqrt((values.astype(np.float64) ** 2).sum(0)).astype(np.float32)
    median_norm = np.sort(norms)[(norms.size - 1) // 2]
    high_norm = int((norms > np.float32(thresholds.high_norm_factor * float(median_norm))).sum())
    return (np.flatnonzero(dead).tolist(), np.flatnonzero(flat).tolist(), np.flatnonzero(massive).tolist(),
            high_norm)


@pytest.mark.parametrize('token_major', [False, True])
def test_flags_found_in_the_capture_equal_numpy_and_other_thresholds_are_found_after_it(token_major,
                                                                                      statistics_backend):
    """A (256, 56, 56) map (a ResNet50 layer1 output at 224) with dead, flat and massive channels and
    high-norm tokens, reduced as a capture's batch: the flags the kernels found in that call under the
    capture's thresholds (PyTorch's reductions find none there), and those summarize finds for the capture's
    and other thresholds, against NumPy."""
    generator = torch.Generator().manual_seed(11)
    fmap = torch.rand(256, 56, 56, generator=generator)  # (C, H, W) in [0, 1)
    fmap[:, 30, 30:34] *= 6.0  # high-norm tokens
    fmap[[3, 90, 200]] = 0.0  # dead
    fmap[17] = 0.75  # flat
    fmap[18] = 1e-6  # at the default dead bar: dead under it, flat under a lower one
    fmap[40, 5, 5] = 400.0  # massive under a factor of 50 (of a median max |x| near 6), not under 100
    fmap[41, 9, 9] = 1000.0  # massive under both
    if token_major:
        fmap = fmap.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (C, H, W) view of (H, W, C) memory
    capture_thresholds = Thresholds(massive_factor=50.0, high_norm_factor=3.0)
    stats = StatisticsReduce(thresholds=capture_thresholds).batch(fmap[None])[0]
    layer = Layer('layer1.0.act3', 'relu', 3, None, 'conv4', shape=(256, 56, 56), stats=stats)
    values = fmap.reshape(256, -1).numpy()

    found = stats.flags_under(capture_thresholds)  # by the capture's call, not by summarize
    expected = _numpy_flags(values, capture_thresholds)
    assert found == (expected if statistics_backend == 'fused' else None)
    assert expected[0] == [3, 18, 90, 200] and expected[1] == [17]
    assert expected[2] == [40, 41] and expected[3] == 6  # the 4 planted tokens and the 2 massive activations
    summary = summarize(layer, capture_thresholds)
    assert (summary.dead_ids, summary.flat_ids, summary.massive_ids, summary.high_norm_tokens) == expected

    other = Thresholds(dead_atol=1e-7, massive_factor=100.0, high_norm_factor=7.0)
    assert stats.flags_under(other) is None  # found after the capture, from its figures
    summary = summarize(layer, other)
    expected = _numpy_flags(values, other)
    assert (summary.dead_ids, summary.flat_ids, summary.massive_ids, summary.high_norm_tokens) == expected
    assert 18 in expected[1] and expected[2] == [41]
