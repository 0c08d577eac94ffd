"""One forward pass -> every inspectable layer as a (C, H, W) feature map.

Hooks are registered per call and always removed (``finally``). A model is shared by many sessions, so
each call publishes its recorder in a ContextVar, and a hook records only when the forward pass runs in
the context of the call that registered it. Two threads capturing the same model at once therefore each
get only their own activations.
"""
from __future__ import annotations

import contextvars
import functools
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .models import T2TViT

__all__ = ['Layer', 'Capture', 'run', 'layer_points']

_active_recorder: contextvars.ContextVar[Optional['_Recorder']] = contextvars.ContextVar(
    't2t_viz_active_recorder', default=None)
_hook_registry_lock = threading.Lock()  # registering/removing hooks mutates the shared module's dicts


@dataclass
class Layer:
    """One captured layer output for one image."""
    name: str  # module path, stable across runs (e.g. 'layer2.1.act2', 'blocks.11')
    kind: str  # 'stem' | 'relu' | 'stage' | 'patch_embed' | 'soft_split' | 'restructurization' | 'projection'
    #           | 'block' | 'mlp_hidden' | 'intermediate'
    depth: int  # 0-based position in the model's layer order
    fmap: torch.Tensor  # (C, H, W)
    label: str = ''  # human name: 'conv25', 'block 12', 'soft split 1'

    @property
    def channels(self) -> int:
        return self.fmap.shape[0]

    @property
    def height(self) -> int:
        return self.fmap.shape[1]

    @property
    def width(self) -> int:
        return self.fmap.shape[2]

    @property
    def tokens(self) -> int:
        return self.height * self.width


@dataclass
class Capture:
    """Everything one forward pass showed about one image."""
    layers: List[Layer]
    logits: torch.Tensor  # (num_classes,)
    input: torch.Tensor  # (3, H, W), preprocessed

    def layer(self, name_or_label: str) -> Layer:
        for layer in self.layers:
            if name_or_label in (layer.name, layer.label):
                return layer
        raise KeyError(f'no layer named {name_or_label!r}')


@dataclass
class _Point:
    module_name: str
    kind: str
    label: str
    to_map: Callable[[torch.Tensor], torch.Tensor]  # module output -> (B, C, H, W)
    written_later: bool = True  # False only where the model is known never to modify this output in place


@dataclass
class _Recorder:
    """What one capture call records, in forward order."""
    points: Dict[str, _Point]
    store: Callable[[torch.Tensor, bool], torch.Tensor]
    outputs: List[Tuple[_Point, torch.Tensor]] = field(default_factory=list)

    def record(self, point: _Point, output: torch.Tensor) -> None:
        fmap = point.to_map(output)
        shares_output = fmap.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
        self.outputs.append((point, self.store(fmap, shares_output and point.written_later)))


def _tokens_to_map(grid: Tuple[int, int], prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, prefix:]  # (B, N, C) without class/prefix tokens
        B, N, C = tokens.shape
        assert N == grid[0] * grid[1], f'{N} tokens do not fit the {grid} grid'
        return tokens.transpose(1, 2).reshape(B, C, *grid)
    return convert


def _identity_map(x: torch.Tensor) -> torch.Tensor:
    return x


def _resnet_points(model: nn.Module) -> List[_Point]:
    written_later = not _is_standard_timm_resnet(model)
    points = []
    conv_number = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU) and (name == 'act1' or re.fullmatch(r'layer\d+\.\d+\.act\d+', name)):
            conv_number += 1  # every ReLU on the main path follows exactly one conv
            kind = 'stem' if name == 'act1' else 'relu'
            points.append(_Point(name, kind, f'conv{conv_number}', _identity_map, written_later))
        elif re.fullmatch(r'layer\d+', name):
            points.append(_Point(name, 'stage', name, _identity_map, written_later))
    # a stage's output fires after its last ReLU: order them by forward execution (the recorder's order)
    return points


def _is_standard_timm_resnet(model: nn.Module) -> bool:
    """timm's ResNet built from its own blocks, whose forward passes never write into a ReLU's output.

    A block's in-place ``x += shortcut`` writes into its fresh conv/norm branch and only reads the block
    input; the stem ReLU feeds a pooling layer and the stage outputs feed the next stage or the head.
    So the captured maps can be kept without a defensive copy (tested against copies in test_engine).
    """
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    if type(model) is not ResNet:
        return False
    stages = [getattr(model, f'layer{i}') for i in range(1, 5)]
    return all(type(block) in (BasicBlock, Bottleneck) for stage in stages for block in stage)


def _vit_points(model: nn.Module, grid: Tuple[int, int], mlp_hidden: bool) -> List[_Point]:
    prefix = getattr(model, 'num_prefix_tokens', 1)
    points = [_Point('patch_embed', 'patch_embed', 'patch tokens', _patch_embed_map(grid))]
    for i in range(len(model.blocks)):
        if mlp_hidden:
            points.append(_Point(f'blocks.{i}.mlp.act', 'mlp_hidden', f'block {i + 1} MLP', _tokens_to_map(grid, prefix)))
        points.append(_Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_to_map(grid, prefix)))
    return points


def _patch_embed_map(grid: Tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[-1] != grid[1]:  # NHWC output (dynamic_img_size)
            return x.permute(0, 3, 1, 2)
        if x.ndim == 4:
            return x
        return _tokens_to_map(grid, 0)(x)
    return convert


def _t2t_points(model: T2TViT, height: int, width: int, mlp_hidden: bool) -> List[_Point]:
    grid1, grid2, grid3 = model.tokens_to_token.grid_sizes(height, width)
    t2t = 'tokens_to_token.'
    points = [
        _Point(t2t + 'soft_split0', 'soft_split', 'soft split 1', _tokens_to_map(grid1, 0)),
        _Point(t2t + 'attention1', 'restructurization', 'restructurization 1', _tokens_to_map(grid1, 0)),
        _Point(t2t + 'soft_split1', 'soft_split', 'soft split 2', _tokens_to_map(grid2, 0)),
        _Point(t2t + 'attention2', 'restructurization', 'restructurization 2', _tokens_to_map(grid2, 0)),
        _Point(t2t + 'soft_split2', 'soft_split', 'soft split 3', _tokens_to_map(grid3, 0)),
        _Point(t2t + 'project', 'projection', 'T2T tokens', _tokens_to_map(grid3, 0)),
    ]
    for i in range(len(model.blocks)):
        if mlp_hidden:
            points.append(_Point(f'blocks.{i}.mlp.act', 'mlp_hidden', f'block {i + 1} MLP', _tokens_to_map(grid3, 1)))
        points.append(_Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_to_map(grid3, 1)))
    return points


def layer_points(model: nn.Module, height: int, width: int, mlp_hidden: bool = False) -> Optional[List[_Point]]:
    """The hook points of a known model family, or None (then forward_intermediates is used)."""
    if isinstance(model, T2TViT):
        return _t2t_points(model, height, width, mlp_hidden)
    if hasattr(model, 'blocks') and hasattr(model, 'patch_embed') and hasattr(model.patch_embed, 'dynamic_feat_size'):
        return _vit_points(model, tuple(model.patch_embed.dynamic_feat_size((height, width))), mlp_hidden)
    if hasattr(model, 'layer1') and hasattr(model, 'act1'):
        return _resnet_points(model)
    return None


def _hook(owner: '_Recorder', module_name: str, module: nn.Module, inputs, output) -> None:
    recorder = _active_recorder.get()
    if recorder is not owner:
        return  # a hook of another capture, or a forward pass of another caller
    point = recorder.points.get(module_name)
    if point is not None:
        recorder.record(point, output)


def _storer(dtype: torch.dtype, max_side: Optional[int]) -> Callable[[torch.Tensor, bool], torch.Tensor]:
    def store(fmap: torch.Tensor, must_copy: bool) -> torch.Tensor:
        fmap = fmap.detach()
        if max_side and max(fmap.shape[-2:]) > max_side:
            fmap = torch.nn.functional.adaptive_avg_pool2d(fmap.float(), max_side)
            must_copy = False
        # a map that is still the module's own memory and may be written later is copied, so that later
        # in-place ops cannot change what was recorded; maps already rebuilt from tokens are not copied twice
        return fmap.to(device='cpu', dtype=dtype, copy=must_copy)
    return store


def run(
        model: nn.Module,
        x: torch.Tensor,
        mlp_hidden: bool = False,
        dtype: torch.dtype = torch.float32,
        max_side: Optional[int] = None,
) -> List[Capture]:
    """Run ``x`` (B, 3, H, W) through ``model`` once; one Capture per image, layers in forward order.

    ``dtype=torch.float16`` halves what is kept; ``max_side`` keeps average-pooled copies no larger than
    that (for display; statistics want the full maps).
    """
    B, _, height, width = x.shape
    points = layer_points(model, height, width, mlp_hidden)
    if points is None:
        return _run_intermediates(model, x, dtype)
    modules = dict(model.named_modules())
    missing = [p.module_name for p in points if p.module_name not in modules]
    if missing:
        raise ValueError(f'model has no modules {missing[:3]} to capture')
    recorder = _Recorder({p.module_name: p for p in points}, _storer(dtype, max_side))
    handles = []
    token = _active_recorder.set(recorder)
    try:
        with _hook_registry_lock:
            for point in points:
                hook = functools.partial(_hook, recorder, point.module_name)
                handles.append(modules[point.module_name].register_forward_hook(hook))
        with torch.inference_mode():
            logits = model(x.to(next(model.parameters()).device))
    finally:
        _active_recorder.reset(token)
        with _hook_registry_lock:
            for handle in handles:
                handle.remove()
    return _split_per_image(recorder.outputs, logits, x)


def _split_per_image(outputs: List[Tuple[_Point, torch.Tensor]], logits: torch.Tensor, x: torch.Tensor) -> List[Capture]:
    captures = []
    for i in range(x.shape[0]):
        layers = [Layer(point.module_name, point.kind, depth, fmaps[i], point.label)
                  for depth, (point, fmaps) in enumerate(outputs)]
        captures.append(Capture(layers, logits[i].float().cpu(), x[i].cpu()))
    return captures


def _run_intermediates(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> List[Capture]:
    """Any other timm model: its own forward_intermediates gives the maps, forward_head the logits."""
    if not hasattr(model, 'forward_intermediates'):
        raise ValueError(f'{type(model).__name__} has no forward_intermediates and no known layer layout')
    with torch.inference_mode():
        final, intermediates = model.forward_intermediates(x.to(next(model.parameters()).device))
        logits = model.forward_head(final)
    store = _storer(dtype, None)
    point = [_Point(f'intermediates.{i}', 'intermediate', f'stage {i + 1}', _identity_map)
             for i in range(len(intermediates))]
    return _split_per_image([(p, store(t, True)) for p, t in zip(point, intermediates)], logits, x)
