"""Token norms, massive activations and PCA colour maps on maps whose answers are known."""
import csv
import io

import numpy as np
import pytest
import torch

from t2t_viz.analysis import pca_rgb, principal_components
from t2t_viz.capture import Layer
from t2t_viz.render import HIGH_NORM_COLOR, norm_image
from t2t_viz.stats import CSV_COLUMNS, Thresholds, csv_text, layer_stats, summarize


def _planted_map():
    """(16, 12, 10) map, |x| <= 1, with a high-norm token at (3, 7) and a massive activation in channel 5."""
    torch.manual_seed(0)
    fmap = torch.rand(16, 12, 10) * 2 - 1
    fmap[:, 3, 7] *= 12  # every channel larger at one token: its L2 norm is ~12x the others
    fmap[5, 9, 2] = 3000.0  # one massive activation (Sun et al.: > 100 and > 1000x the median |x|)
    fmap[5, 0, 0] = -1500.0  # the second largest, negative
    return fmap


def test_norms_and_massive_activations_of_a_planted_map():
    summary = summarize(Layer('blocks.3', 'block', 3, _planted_map(), 'block 4'))
    assert [(t.channel, t.row, t.col) for t in summary.top[:2]] == [(5, 9, 2), (5, 0, 0)]
    assert summary.top[0].value == 3000.0 and summary.top[1].value == -1500.0
    assert summary.median_abs == pytest.approx(0.5, abs=0.1)  # uniform on [-1, 1]
    assert summary.max_abs_ratio == pytest.approx(3000 / summary.median_abs)
    assert summary.sun_massive == 2  # both are over max(100, 1000 x median)
    assert summary.massive_ids == [5]  # the channel-level flag sees it too
    mask = summary.high_norm_mask()
    assert mask.shape == (12, 10)
    # the planted token, and the two tokens holding a massive value, are far above the median token norm
    assert {tuple(p) for p in mask.nonzero().tolist()} == {(3, 7), (9, 2), (0, 0)}
    assert summary.high_norm_tokens == 3
    assert summary.max_token_norm == pytest.approx(float(torch.linalg.vector_norm(_planted_map()[:, 9, 2])))


def test_no_massive_activation_below_the_absolute_bar():
    fmap = torch.full((4, 6, 6), 1e-3)
    fmap[0, 0, 0] = 50.0  # 50000x the median, but under Sun et al.'s absolute 100
    assert summarize(Layer('x', 'block', 0, fmap)).sun_massive == 0


def test_stats_reduced_in_the_hook_equal_stats_of_the_full_map():
    fmap = _planted_map()
    from_map = summarize(Layer('x', 'block', 0, fmap))
    pooled = torch.nn.functional.avg_pool2d(fmap[None], 2)[0].half()  # what a display copy would keep
    from_reduced = summarize(Layer('x', 'block', 0, pooled, shape=tuple(fmap.shape), stats=layer_stats(fmap)))
    assert from_reduced.row('i', 'm', 'w') == from_map.row('i', 'm', 'w')


def test_high_norm_factor_and_csv_columns():
    fmap = _planted_map()
    strict = summarize(Layer("x", "block", 0, fmap), Thresholds(high_norm_factor=2000))  # 3000 / 2.3 < 2000
    assert strict.high_norm_tokens == 0
    rows = list(csv.DictReader(io.StringIO(csv_text([summarize(Layer('x', 'block', 0, fmap)).row('a', 'm', 'w')]))))
    assert tuple(rows[0]) == CSV_COLUMNS
    row = rows[0]
    assert (row['max_abs'], row['max_abs_channel'], row['max_abs_row'], row['max_abs_col']) == ('3000', '5', '9', '2')
    assert row['sun_massive'] == '2' and row['high_norm_tokens'] == '3' and row['procedure'] == 'real_forward'
    assert float(row['high_norm_fraction']) == pytest.approx(3 / 120)


def test_norm_image_outlines_high_norm_tokens():
    norms = torch.ones(4, 4)
    norms[1, 2] = 10
    picture = norm_image(norms, norms > 4, min_side=64)  # 16 pixels per token
    assert picture.shape == (64, 64, 3)
    assert tuple(picture[16, 32]) == HIGH_NORM_COLOR  # the outline of token (1, 2)
    assert tuple(picture[24, 40]) != HIGH_NORM_COLOR  # its inside keeps the colour map
    assert tuple(picture[0, 0]) != HIGH_NORM_COLOR


def test_pca_finds_the_three_planted_directions_up_to_sign():
    torch.manual_seed(1)
    C, H, W = 12, 16, 16
    basis, _ = torch.linalg.qr(torch.randn(C, C))
    directions = basis[:, :3].t()  # (3, C) orthonormal
    scales = torch.tensor([9.0, 5.0, 2.0])
    raw = torch.randn(H * W, 3)
    uncorrelated, _ = torch.linalg.qr(raw - raw.mean(dim=0))  # (N, 3) zero-mean, orthonormal columns
    coefficients = uncorrelated * scales * H  # strongest along the first direction
    tokens = coefficients @ directions + 0.01 * torch.randn(H * W, C) + 3.0  # plus noise and an offset
    fmap = tokens.t().reshape(C, H, W)
    found = principal_components(fmap, 3)
    for i in range(3):
        assert abs(float(found.directions[i] @ directions[i])) == pytest.approx(1.0, abs=1e-3)
    assert float(found.explained.sum()) == pytest.approx(1.0, abs=1e-3)
    assert found.explained[0] > found.explained[1] > found.explained[2]
    rgb = pca_rgb(fmap)
    assert rgb.shape == (H, W, 3) and rgb.min() == 0 and rgb.max() == 1
    for i in range(3):  # each colour is its component, scaled to [0, 1]
        component = found.projections[i].numpy()
        np.testing.assert_allclose(rgb[..., i], (component - component.min()) / np.ptp(component), atol=1e-5)


def test_pca_of_a_map_with_fewer_channels_than_colours():
    rgb = pca_rgb(torch.randn(2, 5, 5))
    assert rgb.shape == (5, 5, 3) and np.all(rgb[..., 2] == 0)


def test_pca_against_numpy_eigendecomposition():
    """Channels with different means and scales: directions, projections and explained variance as NumPy's
    covariance (ddof 1) and eigh give them, the sign chosen so the farthest token is positive."""
    generator = torch.Generator().manual_seed(3)
    fmap = torch.randn(5, 6, 7, generator=generator) * torch.tensor([3.0, 1.0, 0.5, 2.0, 0.1])[:, None, None]
    fmap += torch.tensor([10.0, -4.0, 0.0, 1.0, 7.0])[:, None, None]
    found = principal_components(fmap, 3)
    tokens = fmap.reshape(5, -1).t().double().numpy()  # (N, C)
    centered = tokens - tokens.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov(tokens, rowvar=False))
    order = np.argsort(values)[::-1][:3]
    np.testing.assert_allclose(found.explained.numpy(), values[order] / values.sum(), rtol=1e-5)
    for i, column in enumerate(order):
        projection = centered @ vectors[:, column]
        sign = np.sign(projection[np.argmax(np.abs(projection))])
        np.testing.assert_allclose(found.directions[i].numpy(), sign * vectors[:, column], atol=1e-5)
        np.testing.assert_allclose(found.projections[i].numpy().ravel(), sign * projection, rtol=1e-4, atol=1e-4)
        assert found.projections[i].numpy().ravel()[np.argmax(np.abs(projection))] > 0


def test_pca_of_constant_and_rank_deficient_maps():
    constant = principal_components(torch.full((4, 3, 3), 2.5), 3)
    assert constant.explained.tolist() == [0.0, 0.0, 0.0] and constant.explained.dtype == torch.float32
    assert torch.allclose(constant.directions.norm(dim=1), torch.ones(3))  # unit directions, even with no variance
    assert pca_rgb(torch.full((4, 3, 3), 2.5)).tolist() == np.zeros((3, 3, 3)).tolist()
    line = torch.zeros(3, 4, 4)
    line[0] = torch.arange(16.0).reshape(4, 4) * 1e-3  # one varying channel, tiny variance: ratios still exact
    flat_line = principal_components(line, 3)
    assert flat_line.explained.tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    assert torch.allclose(flat_line.directions.norm(dim=1), torch.ones(3))
    rgb = pca_rgb(line)
    assert not np.isnan(rgb).any() and rgb[..., 0].max() == 1 and not rgb[..., 1:].any()


def test_three_components_by_default():
    assert principal_components(torch.randn(6, 4, 4)).projections.shape == (3, 4, 4)
