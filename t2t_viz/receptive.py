"""Where a position of a layer's grid lies on the model's input: the box to outline on the image it saw.

* ViT patch tokens and blocks: the token's own patch (the grid's cell);
* T2T-ViT: the token's soft-split support, composed through the soft splits up to the layer's grid (7/3/3
  kernels, 4/2/2 strides: 7, 15 and 31 pixels at strides 4, 8 and 16); restructurization and the blocks
  then mix in the other tokens by attention, which no box can show;
* CNNs: the theoretical receptive field of the main path (convolutions and poolings, in the order the
  forward pass runs them; a ResNet's shortcut sees a part of it);
* anything else (timm's ``forward_intermediates`` stages): the grid's cell.

Boxes are (top, left, bottom, right) in input pixels, bottom and right exclusive, clipped to the input.
"""
from __future__ import annotations

import functools
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn as nn

from .capture import REAL_FORWARD, hooks_installed, model_device
from .models import T2TViT

__all__ = ['Geometry', 'layer_geometry', 'input_box']

_CNN_KINDS = ('stem', 'relu', 'stage', 'conv')
_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Geometry:
    """Position (row, col) of a layer covers input pixels [start + row * jump, start + row * jump + size)
    along each axis (a receptive field of ``size`` pixels at stride ``jump``)."""
    size: Tuple[int, int]
    jump: Tuple[float, float]
    start: Tuple[float, float]


def _pair(value) -> Tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _compose(steps: List[Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]]) -> Geometry:
    """Receptive field of a chain of (kernel, stride, padding, dilation) steps."""
    size, jump, start = [1, 1], [1, 1], [0.0, 0.0]
    for kernel, stride, padding, dilation in steps:
        for axis in (0, 1):
            size[axis] += (kernel[axis] - 1) * dilation[axis] * jump[axis]
            start[axis] -= padding[axis] * jump[axis]
            jump[axis] *= stride[axis]
    return Geometry(tuple(size), tuple(jump), tuple(start))


def _step(module: nn.Module):
    return (_pair(module.kernel_size), _pair(module.stride), _pair(module.padding),
            _pair(getattr(module, 'dilation', 1)))


def _t2t_geometry(model: T2TViT, layer: str) -> Geometry:
    t2t = model.tokens_to_token
    splits = [t2t.soft_split0, t2t.soft_split1, t2t.soft_split2]
    used = {'tokens_to_token.soft_split0': 1, 'tokens_to_token.attention1': 1, 'tokens_to_token.soft_split1': 2,
            'tokens_to_token.attention2': 2}.get(layer, 3)
    return _compose([_step(split.unfold) for split in splits[:used]])


_run_orders: "weakref.WeakKeyDictionary[nn.Module, Dict[str, nn.Module]]" = weakref.WeakKeyDictionary()
_run_orders_lock = threading.Lock()


def _record_first_run(order: Dict[str, nn.Module], name: str, module: nn.Module, inputs, output) -> None:
    order.setdefault(name, module)


def _run_order(model: nn.Module) -> Dict[str, nn.Module]:
    """Every named module of ``model`` in the order a forward pass first runs it (found once per model, with
    a small input; a property of the architecture, kept as long as the model lives)."""
    with _run_orders_lock:
        known = _run_orders.get(model)
    if known is not None:
        return known
    order: Dict[str, nn.Module] = {}  # insertion order: the order the pass ran them
    hooks = [(module, functools.partial(_record_first_run, order, name))
             for name, module in model.named_modules() if name]
    with hooks_installed(object(), hooks), torch.inference_mode():
        model(torch.zeros(1, 3, 64, 64, device=model_device(model)))
    with _run_orders_lock:
        _run_orders[model] = order
    return order


def _cnn_geometry(model: nn.Module, layer: str, procedure: str) -> Geometry:
    if procedure != REAL_FORWARD:  # the notebook chain: its convolutions one after another, nothing between
        from .procedures import main_path_convs
        convs = main_path_convs(model)
        names = [name for name, _ in convs]
        return _compose([_step(conv) for _, conv in convs[:names.index(layer) + 1]])
    steps = []
    for name, module in _run_order(model).items():
        if isinstance(module, _SPATIAL) and 'downsample' not in name.split('.'):
            steps.append(_step(module))
        if name == layer:
            break
    return _compose(steps)


def layer_geometry(model: nn.Module, layer: str, kind: str, grid: Tuple[int, int], input_size: Tuple[int, int],
                   procedure: str = REAL_FORWARD) -> Geometry:
    """The receptive geometry of ``layer`` (a capture's module path and kind) on an input of ``input_size``."""
    if isinstance(model, T2TViT) and kind != 'intermediate':
        return _t2t_geometry(model, layer)
    if kind in _CNN_KINDS:
        return _cnn_geometry(model, layer, procedure)
    jump = (input_size[0] / grid[0], input_size[1] / grid[1])
    return Geometry((round(jump[0]), round(jump[1])), jump, (0.0, 0.0))


def input_box(geometry: Geometry, row: int, col: int, input_size: Tuple[int, int],
              ) -> Tuple[int, int, int, int]:
    """(top, left, bottom, right) of grid position (row, col) on the input, clipped to it."""
    top = geometry.start[0] + row * geometry.jump[0]
    left = geometry.start[1] + col * geometry.jump[1]
    bottom, right = top + geometry.size[0], left + geometry.size[1]
    height, width = input_size
    return (max(0, int(round(top))), max(0, int(round(left))), min(height, int(round(bottom))),
            min(width, int(round(right))))

