"""What the pages draw, computed without Streamlit: overlays on the model's input, log axes, prefix tokens."""
import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config

from t2t_viz import zoo
from t2t_viz.capture import Capture, Layer
from t2t_viz.pipeline import ModelResult, inspect_images
from t2t_viz.procedures import PAPER_NOTEBOOK
from t2t_viz.stats import layer_stats, summarize
from t2t_viz.ui.explore import norms_figure
from t2t_viz.views import depth_curves, log_axis_top, on_log_axis


def test_the_seen_image_is_the_resized_centre_crop_of_the_upload(chelsea):
    model = timm.create_model('resnet18').eval()
    config = resolve_data_config(model=model)  # bicubic, crop_pct 0.95
    loaded = zoo.LoadedModel('resnet18', model, zoo.WeightsInfo('random', False), config)
    result = inspect_images(loaded, [chelsea], dtype=torch.float16, max_side=32)[0]
    seen = result.seen_image()
    short = math.floor(224 / config['crop_pct'])  # the shorter side first goes to 235 pixels
    width = int(short * chelsea.width / chelsea.height)
    resized = chelsea.resize((width, short), Image.BICUBIC)
    left, top = round((width - 224) / 2), round((short - 224) / 2)
    expected = np.asarray(resized.crop((left, top, left + 224, top + 224)), dtype=np.int16)
    assert seen.size == (224, 224)
    assert np.abs(np.asarray(seen, dtype=np.int16) - expected).max() <= 3  # float16 storage of the input
    notebook = inspect_images(loaded, [chelsea], procedure=PAPER_NOTEBOOK, dtype=torch.float16, max_side=32)[0]
    squashed = np.asarray(chelsea.resize((224, 224), Image.BILINEAR), dtype=np.int16)  # the notebooks' input
    assert np.abs(np.asarray(notebook.seen_image(), dtype=np.int16) - squashed).max() <= 1
    stats_only = inspect_images(loaded, [chelsea], keep_maps=False)[0]
    with pytest.raises(ValueError, match='kept no input'):
        stats_only.seen_image()


def test_log_axis_keeps_infinite_values_at_the_top_edge():
    top = log_axis_top([3.0, math.inf, 2e4, math.nan, 0.0])
    assert top == 1e5 and on_log_axis(math.inf, top) == top and on_log_axis(2e4, top) == 2e4
    assert on_log_axis(0.0, top) is None and on_log_axis(math.nan, top) is None
    assert log_axis_top([]) == 1e4  # above the 1000x line of Sun et al.


def _result(layers):
    capture = Capture(layers, None, None)
    return ModelResult('m', zoo.WeightsInfo('random', False), capture, [summarize(layer) for layer in layers], [])


def test_norms_chart_draws_a_median_zero_layer_at_the_top_and_the_prefix_tokens():
    relu = torch.zeros(8, 10, 10)
    relu[:, :3] = torch.rand(8, 3, 10) + 0.1  # 30% positive: median |x| is 0
    block = torch.rand(8, 10, 10) + 0.5
    class_token = torch.full((1, 8), 900.0)
    layers = [Layer('act1', 'stem', 0, relu, 'conv1'),
              Layer('blocks.0', 'block', 1, block, 'block 1', stats=layer_stats(block, class_token))]
    curves = pd.DataFrame(depth_curves({'m': _result(layers)}))
    assert math.isinf(curves.max_abs_ratio[0]) and curves.prefix_tokens.tolist() == [0, 1]
    figure = norms_figure(curves, [])
    traces = {trace.name: trace for trace in figure.data}
    top = log_axis_top(list(curves.max_abs_ratio) + list(curves.prefix_max_abs_ratio))
    line = traces['m']
    assert list(line.y) == [top, curves.max_abs_ratio[1]]  # nothing dropped from the line
    median_zero = traces['median |x| is 0 (ratio infinite)']
    assert list(median_zero.y) == [top] and median_zero.text == 'median 0'
    assert list(traces['prefix tokens (class, registers)'].y) == pytest.approx([900.0 / curves.median_abs[1]])
