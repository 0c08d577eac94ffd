"""View data for the app, computed without Streamlit: stage steps, depth curves, compare defaults."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .figure import figure_layers
from .pipeline import ModelResult
from .render import DEAD_COLOR, FLAT_COLOR, MASSIVE_COLOR

__all__ = ['StageStep', 't2t_steps', 'depth_curves', 'compare_depths', 'soft_split_windows', 'denormalize']

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
    |x| over the median |x|, Sun et al.'s massive count and the high-norm token fraction."""
    rows = []
    for name, result in results.items():
        summaries = [s for s in result.summaries if s.kind in kinds]
        for i, s in enumerate(summaries):
            top = s.top[0] if s.top else None
            rows.append(dict(
                model=name, layer=s.name, label=s.label, relative_depth=i / max(1, len(summaries) - 1),
                dead_fraction=s.fraction(s.dead), flat_fraction=s.fraction(s.flat),
                massive_fraction=s.fraction(s.massive), massive_count=s.massive,
                max_abs=abs(top.value) if top else 0.0,
                max_abs_ratio=s.max_abs_ratio, max_abs_channel=top.channel if top else -1,
                max_abs_position=f'({top.row}, {top.col})' if top else '', sun_massive=s.sun_massive,
                high_norm_fraction=s.high_norm_tokens / s.tokens if s.tokens else 0.0))
    return rows


def compare_depths(result: ModelResult) -> Tuple[str, str]:
    """The paper's Figure 2 pair of a model: ResNet conv1/conv25, token models block 1/block 12."""
    return figure_layers([layer.label for layer in result.capture.layers])


def denormalize(x: torch.Tensor, mean, std) -> Image.Image:
    """Preprocessed (3, H, W) tensor back to the RGB image the model saw."""
    image = x.float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


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
