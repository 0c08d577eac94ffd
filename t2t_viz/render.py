"""Pictures of layers as RGB arrays: channel grids, overlays, PCA colour maps, token-norm maps (PNG for the CLI)."""
from __future__ import annotations

import io
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .analysis import pca_rgb
from .stats import LayerSummary

__all__ = ['DEAD_COLOR', 'MASSIVE_COLOR', 'FLAT_COLOR', 'HIGH_NORM_COLOR', 'COLORMAPS', 'normalize_channels',
           'order_channels', 'channel_grid', 'colorize', 'overlay', 'blend', 'upscale', 'pca_image', 'norm_image',
           'side_by_side', 'save_png', 'png_bytes', 'outline', 'example_picture', 'BOX_COLOR']

DEAD_COLOR = (230, 25, 25)
MASSIVE_COLOR = (255, 170, 0)
FLAT_COLOR = (60, 120, 255)
HIGH_NORM_COLOR = (255, 40, 40)
_VIRIDIS_STOPS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58',
                  '#b5de2b', '#fde725']


def _viridis_lut() -> np.ndarray:
    stops = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in _VIRIDIS_STOPS], dtype=np.float64)
    positions = np.linspace(0, 1, len(stops))
    grid = np.linspace(0, 1, 256)
    return np.stack([np.interp(grid, positions, stops[:, k]) for k in range(3)], axis=1).round().astype(np.uint8)


COLORMAPS = {'viridis': _viridis_lut(), 'gray': np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)}


def normalize_channels(fmap: torch.Tensor) -> np.ndarray:
    """Each channel of (C, H, W) scaled to [0, 1] by its own min and max; constant channels become 0.

    A dead (all-zero) or flat channel has max == min: it is drawn at 0, never divided by zero. Computed with
    NumPy: pictures are drawn between forward passes, where PyTorch's thread pool would only compete with
    the server for the cores.
    """
    values = fmap.detach().float().cpu().numpy().reshape(fmap.shape[0], -1)  # (C, H*W)
    low = values.min(axis=1, keepdims=True)
    spread = values.max(axis=1, keepdims=True) - low
    scaled = np.divide(values - low, spread, out=np.zeros_like(values), where=spread > 0)
    return scaled.reshape(tuple(fmap.shape))


def colorize(unit: np.ndarray, cmap: str = 'viridis') -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 in a colour map ('viridis', or 'gray' as the notebooks drew)."""
    levels = (np.clip(unit, 0, 1) * 255 + 0.5).astype(np.uint8)
    return np.take(COLORMAPS[cmap], levels, axis=0)


def order_channels(summary: LayerSummary, sort: str = 'index', flagged_only: bool = False,
                   limit: Optional[int] = None) -> List[int]:
    """Channel ids to show: by index, or by max |x| / mean (largest first); optionally flagged only."""
    ids = list(range(summary.channels))
    if flagged_only:
        flagged = set(summary.dead_ids) | set(summary.massive_ids) | set(summary.flat_ids)
        ids = [i for i in ids if i in flagged]
    if sort == 'max':
        ids.sort(key=lambda i: -float(summary.stats.max_abs[i]))
    elif sort == 'mean':
        ids.sort(key=lambda i: -float(summary.stats.mean[i]))
    elif sort != 'index':
        raise ValueError(f"sort must be 'index', 'max' or 'mean', not {sort!r}")
    return ids[:limit] if limit else ids


def channel_grid(fmap: torch.Tensor, summary: Optional[LayerSummary] = None, channels: Optional[Sequence[int]] = None,
                 columns: Optional[int] = None, cell: Optional[int] = None, border: int = 2,
                 cmap: str = 'viridis') -> np.ndarray:
    """One composite RGB image of the chosen channels of a (C, H, W) map.

    Each channel is scaled by its own range (constant ones drawn dark) and framed: red for dead, orange for
    massive, blue for flat, dark grey otherwise.
    """
    channels = list(range(fmap.shape[0])) if channels is None else list(channels)
    if not channels:
        return np.full((cell or 32, cell or 32, 3), 255, dtype=np.uint8)
    height, width = fmap.shape[1:]
    if cell is None:
        cell = int(min(96, max(32, max(height, width))))
    scale = cell / max(height, width)
    cell_h, cell_w = max(1, round(height * scale)), max(1, round(width * scale))
    columns = columns or max(1, math.ceil(math.sqrt(len(channels) * cell_h / cell_w)))
    rows = math.ceil(len(channels) / columns)
    pitch_h, pitch_w = cell_h + 2 * border + 2, cell_w + 2 * border + 2
    canvas = np.full((rows * pitch_h, columns * pitch_w, 3), 255, dtype=np.uint8)
    tiles = colorize(_resize_stack(normalize_channels(fmap[channels]), cell_h, cell_w), cmap)  # (N, h, w, 3)
    frames = {channel: FLAT_COLOR for channel in (summary.flat_ids if summary else ())}
    frames.update({channel: MASSIVE_COLOR for channel in (summary.massive_ids if summary else ())})
    frames.update({channel: DEAD_COLOR for channel in (summary.dead_ids if summary else ())})
    for slot, channel in enumerate(channels):
        top, left = (slot // columns) * pitch_h + 1, (slot % columns) * pitch_w + 1
        canvas[top:top + cell_h + 2 * border, left:left + cell_w + 2 * border] = frames.get(channel, (90, 90, 90))
        canvas[top + border:top + border + cell_h, left + border:left + border + cell_w] = tiles[slot]
    return canvas


def _resize_stack(unit: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) -> (N, height, width): whole token squares when enlarging, box averages when shrinking."""
    N, H, W = unit.shape
    if (H, W) == (height, width):
        return unit
    if height >= H and width >= W:  # nearest neighbour: each token a block of pixels
        return unit[:, (np.arange(height) * H // height)[:, None], np.arange(width) * W // width]
    return np.stack([np.asarray(Image.fromarray(tile, 'F').resize((width, height), Image.BOX)) for tile in unit])


def map_picture(channel_map: torch.Tensor, min_side: int = 1, cmap: str = 'viridis') -> np.ndarray:
    """One (H, W) map scaled to its own range and coloured, enlarged (whole tokens) to at least ``min_side``."""
    return upscale(colorize(normalize_channels(channel_map.unsqueeze(0))[0], cmap), min_side)


def overlay(channel_map: torch.Tensor, image: Image.Image, alpha: float = 0.5) -> np.ndarray:
    """(H, W) map resized onto the (RGB) image and blended, as (H_img, W_img, 3) uint8."""
    return blend(map_picture(channel_map), image, alpha)


def blend(rgb: np.ndarray, image: Image.Image, alpha: float = 0.5, resample=Image.BILINEAR) -> np.ndarray:
    """An (h, w, 3) uint8 picture resized onto the image and blended, as (H_img, W_img, 3) uint8."""
    picture = Image.fromarray(rgb).resize(image.size, resample)
    return np.asarray(Image.blend(image.convert('RGB'), picture, alpha))


def upscale(rgb: np.ndarray, min_side: int = 224) -> np.ndarray:
    """Nearest-neighbour enlargement of a small (h, w, 3) picture so each token stays a visible square."""
    factor = max(1, math.ceil(min_side / max(rgb.shape[:2])))
    return rgb.repeat(factor, axis=0).repeat(factor, axis=1)


def pca_image(fmap: torch.Tensor) -> np.ndarray:
    """The layer's first three principal components as an (H, W, 3) uint8 RGB picture on its grid."""
    return (pca_rgb(fmap) * 255).round().astype(np.uint8)


def norm_image(token_norms: torch.Tensor, high_norm: Optional[torch.Tensor] = None, min_side: int = 224) -> np.ndarray:
    """(H, W) token norms in viridis, enlarged; high-norm tokens outlined red (filled red on dense grids)."""
    norms = token_norms.float()
    low, high = float(norms.min()), float(norms.max())
    unit = ((norms - low) / (high - low)).numpy() if high > low else np.zeros(tuple(norms.shape))
    picture = upscale(colorize(unit), min_side)
    factor = picture.shape[0] // unit.shape[0]
    if high_norm is None or not bool(high_norm.any()):
        return picture
    rows, cols = np.nonzero(high_norm.numpy())
    if factor < 4:  # too small to outline: mark the token itself
        for row, col in zip(rows, cols):
            picture[row * factor:(row + 1) * factor, col * factor:(col + 1) * factor] = HIGH_NORM_COLOR
        return picture
    width = max(1, factor // 6)
    for row, col in zip(rows, cols):
        top, left = row * factor, col * factor
        cell = picture[top:top + factor, left:left + factor]
        cell[:width], cell[-width:], cell[:, :width], cell[:, -width:] = (HIGH_NORM_COLOR,) * 4
    return picture


BOX_COLOR = (255, 40, 40)


def outline(rgb: np.ndarray, box: Tuple[int, int, int, int], color=BOX_COLOR, width: int = 2) -> np.ndarray:
    """A copy of an (H, W, 3) picture with the (top, left, bottom, right) box outlined (bottom, right exclusive),
    the outline drawn inside the box."""
    picture = rgb.copy()
    top, left, bottom, right = box
    width = max(1, min(width, (bottom - top) // 2 or 1, (right - left) // 2 or 1))
    picture[top:top + width, left:right] = color
    picture[bottom - width:bottom, left:right] = color
    picture[top:bottom, left:left + width] = color
    picture[top:bottom, right - width:right] = color
    return picture


def example_picture(seen: Image.Image, channel_map: torch.Tensor, box: Tuple[int, int, int, int],
                    side: int = 160) -> np.ndarray:
    """One top example as a column of three ``side`` x ``side`` panels: the image the model saw with the box of
    the channel's maximum outlined, the box's pixels enlarged, and the channel's (H, W) map over the image."""
    top, left, bottom, right = box
    scale_y, scale_x = side / seen.height, side / seen.width
    small = np.asarray(seen.convert('RGB').resize((side, side), Image.BILINEAR))
    shown = (int(top * scale_y), int(left * scale_x), max(int(top * scale_y) + 1, round(bottom * scale_y)),
             max(int(left * scale_x) + 1, round(right * scale_x)))
    crop = np.asarray(seen.convert('RGB').crop((left, top, right, bottom)).resize((side, side), Image.NEAREST))
    over = np.asarray(Image.fromarray(overlay(channel_map, seen)).resize((side, side), Image.BILINEAR))
    gap = np.full((4, side, 3), 255, dtype=np.uint8)
    return np.concatenate([outline(small, shown), gap, crop, gap, over], axis=0)


def side_by_side(pictures: Sequence[np.ndarray], gap: int = 8) -> np.ndarray:
    """RGB pictures (h_i, w_i, 3) in one row, top-aligned on white, ``gap`` white pixels after each."""
    height = max(p.shape[0] for p in pictures)
    return np.concatenate([np.pad(p, ((0, height - p.shape[0]), (0, gap), (0, 0)), constant_values=255)
                           for p in pictures], axis=1)


def save_png(array: np.ndarray, path: str) -> None:
    Image.fromarray(array).save(path, format='PNG')


def png_bytes(array: np.ndarray) -> bytes:
    """The picture encoded as PNG, for download buttons."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format='PNG')
    return buffer.getvalue()
