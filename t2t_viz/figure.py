"""The paper's Figure 2 on any image: one composite picture, panels of the same size and channel count.

Figure 2 of *Tokens-to-Token ViT* shows feature maps of ResNet50 (conv1, conv25), ViT-L/16 (block 1,
block 12) and T2T-ViT-24 (block 1, block 12). :func:`figure_layers` names those layers for a model
(any ResNet, ViT or T2T-ViT: the first layer and the one at about half depth for others), and
:func:`compose` lays the panels out, one row per model, each panel titled with its model, layer, grid,
procedure and dead/flat fractions, flagged channels outlined.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .capture import Layer
from .procedures import describe
from .render import channel_grid, pca_image, upscale
from .stats import LayerSummary

__all__ = ['Panel', 'FIGURE2_LAYERS', 'figure_layers', 'compose', 'heading_for', 'DEFAULT_CHANNELS', 'DEFAULT_SIZE']

DEFAULT_CHANNELS = 36  # the notebooks drew the first 36 channels of a layer, 6 x 6
DEFAULT_SIZE = 1024  # the paper's authors: 1024 or more for maps that are not noisy
FIGURE2_LAYERS = (('conv1', 'conv25'), ('block 1', 'block 12'))  # ResNet50; ViT-L/16 and T2T-ViT-24
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


@dataclass
class Panel:
    """One model's layer, by one procedure, ready to draw."""
    model: str  # the name shown, e.g. 'resnet50.tv_in1k'
    layer: Layer  # with its kept map
    summary: LayerSummary
    procedure: str
    weights: str  # 'trained' or 'random'

    @property
    def title(self) -> str:
        s = self.summary
        return (f'{self.model} · {self.layer.label} · {s.height}x{s.width}, {s.channels} channels\n'
                f'dead {s.dead} ({s.fraction(s.dead):.1%}) · flat {s.flat} ({s.fraction(s.flat):.1%}) · '
                f'massive {s.massive}' + ('' if self.weights == 'trained' else ' · RANDOM WEIGHTS'))


def figure_layers(labels: Sequence[str]) -> Tuple[str, str]:
    """The pair of layer labels Figure 2 shows for a model with these layer labels."""
    for pair in FIGURE2_LAYERS:
        if all(label in labels for label in pair):
            return pair
    blocks = [label for label in labels if label.startswith(('block ', 'conv'))] or list(labels)
    return blocks[0], blocks[min(len(blocks) - 1, len(blocks) // 2)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _panel_picture(panel: Panel, channels: int, columns: int, cell: int, mode: str, cmap: str) -> np.ndarray:
    if mode == 'pca':
        return upscale(pca_image(panel.layer.fmap), columns * (cell + 6))
    chosen = list(range(min(channels, panel.layer.channels)))
    return channel_grid(panel.layer.fmap, panel.summary, chosen, columns=columns, cell=cell, cmap=cmap)


def compose(rows: Sequence[Sequence[Panel]], channels: int = DEFAULT_CHANNELS, cell: int = 64, mode: str = 'grid',
            cmap: str = 'gray', heading: Optional[str] = None) -> np.ndarray:
    """One (H, W, 3) uint8 picture: a row of panels per model, every panel the same size.

    ``mode`` 'grid' draws the first ``channels`` channels of each layer (each scaled by its own range, dead
    outlined red, massive orange, flat blue); 'pca' draws the first three principal components as RGB.
    """
    if mode not in ('grid', 'pca'):
        raise ValueError(f"mode must be 'grid' or 'pca', not {mode!r}")
    columns = max(1, math.ceil(math.sqrt(channels)))
    pictures = [[_panel_picture(p, channels, columns, cell, mode, cmap) for p in row] for row in rows]
    title_font, heading_font = _font(13), _font(16)
    panel_w = max([pic.shape[1] for row in pictures for pic in row] + [440])
    panel_h = max(pic.shape[0] for row in pictures for pic in row)
    title_h, gap = 38, 16
    heading_h = 30 if heading else 0
    per_row = max(len(row) for row in rows)
    width = per_row * panel_w + (per_row + 1) * gap
    height = heading_h + len(rows) * (title_h + panel_h + gap) + gap
    canvas = Image.new('RGB', (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if heading:
        draw.text((gap, 8), heading, fill=_TEXT, font=heading_font)
    top = heading_h + gap
    for row, row_pictures in zip(rows, pictures):
        left = gap
        for panel, picture in zip(row, row_pictures):
            draw.multiline_text((left, top), panel.title, fill=_TEXT, font=title_font, spacing=4)
            canvas.paste(Image.fromarray(picture), (left, top + title_h))
            left += panel_w + gap
        top += title_h + panel_h + gap
    return np.asarray(canvas)


def heading_for(image_name: str, img_size: int, procedure: str) -> str:
    return f'{image_name} at {img_size}x{img_size} · {describe(procedure)}'
