"""View data for the app, computed without Streamlit: stage steps, depth curves, compare defaults."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from PIL import Image, ImageDraw

from .figure import figure_layers
from .pipeline import ModelResult
from .render import DEAD_COLOR, FLAT_COLOR, MASSIVE_COLOR

__all__ = ['StageStep', 't2t_steps', 'depth_curves', 'compare_depths', 'soft_split_windows', 'log_axis_top',
           'on_log_axis']

_STAGE_KINDS = ('soft_split', 'restructurization', 'projection')


@dataclass
class StageStep:
    name: str
    tokens: int
    grid: Tuple[int, int]
    width: int
    layer_index: Optional[int]  # index into the capture's layers; None for the input image

    @property
    def shape(self) -> str:
        return f'{self.tokens} tokens x {self.width} = ({self.width}, {self.grid[0]}, {self.grid[1]}) map'


def t2t_steps(result: ModelResult) -> List[StageStep]:
    """input -> soft split 1 -> restructurization 1 -> ... -> projection -> backbone (first block)."""
    _, height, width = result.capture.input.shape
    steps = [StageStep('input', height * width, (height, width), 3, None)]
    for index, layer in enumerate(result.capture.layers):
        if layer.kind in _STAGE_KINDS:
            steps.append(StageStep(layer.label, layer.tokens, (layer.height, layer.width), layer.channels, index))
        elif layer.kind == 'block':
            steps.append(StageStep('backbone (block 1)', layer.tokens, (layer.height, layer.width),
                                   layer.channels, index))
            break
    return steps


def depth_curves(results: Dict[str, ModelResult],
                 kinds: Tuple[str, ...] = ('stem', 'relu', 'conv', 'block')) -> List[dict]:
    """Rows per model and layer for charts against relative depth in [0, 1]: flag fractions, the largest
    |x| over the median |x|, Sun et al.'s massive count, the high-norm token fraction, and the same figures
    of the prefix tokens (NaN, 0 or '' for layers without them)."""
    rows = []
    for name, result in results.items():
        summaries = [s for s in result.summaries if s.kind in kinds]
        for i, s in enumerate(summaries):
            top = s.top[0] if s.top else None
            prefix = s.prefix_largest
            rows.append(dict(
                model=name, layer=s.name, label=s.label, relative_depth=i / max(1, len(summaries) - 1),
                dead_fraction=s.fraction(s.dead), flat_fraction=s.fraction(s.flat),
                massive_fraction=s.fraction(s.massive), massive_count=s.massive,
                max_abs=abs(top.value) if top else 0.0, median_abs=s.median_abs,
                max_abs_ratio=s.max_abs_ratio, max_abs_channel=top.channel if top else -1,
                max_abs_position=f'({top.row}, {top.col})' if top else '', sun_massive=s.sun_massive,
                high_norm_fraction=s.high_norm_tokens / s.tokens if s.tokens else 0.0,
                prefix_tokens=len(s.prefix), prefix_max_abs=prefix.max_abs if prefix else math.nan,
                prefix_max_abs_ratio=s.prefix_max_abs_ratio,
                prefix_max_abs_token=prefix.index if prefix else -1,
                prefix_max_norm=max((t.norm for t in s.prefix), default=math.nan),
                prefix_sun_massive=sum(t.sun_massive for t in s.prefix),
                prefix_high_norm_tokens=sum(t.high_norm for t in s.prefix)))
    return rows


def log_axis_top(values: Iterable[float], floor: float = 1000.0) -> float:
    """Where an infinite value is drawn on a log axis: a power of ten above every finite positive value
    (and above ``floor``), so that it sits at the chart's top edge instead of vanishing."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return 10.0 ** math.ceil(math.log10(max(finite + [floor]) * 3))


def on_log_axis(value: float, top: float) -> Optional[float]:
    """A value as a log axis can draw it: inf at ``top``, 0 or NaN left out (None)."""
    if math.isinf(value) and value > 0:
        return top
    return value if math.isfinite(value) and value > 0 else None


def compare_depths(result: ModelResult) -> Tuple[str, str]:
    """The paper's Figure 2 pair of a model: ResNet conv1/conv25, token models block 1/block 12."""
    return figure_layers([layer.label for layer in result.capture.layers])


def soft_split_windows(image: Image.Image, kernel: int, stride: int, padding: int,
                       count: int = 4, scale: int = 4) -> Image.Image:
    """The first ``count`` overlapping soft-split windows of the top row, drawn on an enlarged crop."""
    span = padding + stride * (count - 1) + kernel
    crop = image.crop((0, 0, span, span)).resize((span * scale, span * scale), Image.NEAREST)
    draw = ImageDraw.Draw(crop)
    colors = [DEAD_COLOR, MASSIVE_COLOR, FLAT_COLOR, (40, 180, 80)]
    for i in range(count):
        left = (i * stride - padding) * scale
        draw.rectangle([left, -padding * scale, left + kernel * scale - 1, (kernel - padding) * scale - 1],
                       outline=colors[i % len(colors)], width=2)
    return crop
