"""Feature maps the way the paper's notebooks computed them, beside the real forward pass.

The figures of *Tokens-to-Token ViT* (Figure 2) come from two released notebooks in the authors'
repository (``visualization_resnet.ipynb``, ``visualization_vit.ipynb``). They do not run the models'
forward passes. What they do, as this module re-implements it (our code, from that description):

* **Input**: the image is resized to a square (224 for ResNet50, 512 for ViT with 1024 or 2048
  suggested) and scaled to [0, 1]; no mean/std normalization.
* **ResNet50**: the 49 ``Conv2d`` layers of the main path alone, chained in definition order, each fed
  the previous conv's output: no BatchNorm, ReLU, max-pooling, residual or downsample branch.
* **ViT-L/16**: the patch embedding, then the transformer blocks one after another, with no class token
  and no position embedding.
* **T2T-ViT-24**: no notebook was released; our analogue applies the same recipe: the Tokens-to-Token
  module, then the blocks, with no class token and no position table.

The recipe is defined for these three families: ResNets (any timm ``ResNet``: a stem conv and stages of
blocks whose main path is ``conv1``, ``conv2``...), ViTs (timm's ``VisionTransformer`` and its subclasses)
and T2T-ViT. Other models (EfficientNet, MobileNet, ConvNeXt, Swin...) have no main path that is a chain of
convs or of blocks taking tokens alone, and are refused with a one-line :class:`ValueError`.

Each procedure returns the same :class:`~t2t_viz.capture.Capture` records as the real forward pass,
labelled with their procedure, so every view, statistic and CSV works on either. Layers carry the same
labels as in the real forward pass (``conv25``, ``block 12``) so the two can be put side by side.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Collection, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

from .capture import (REAL_FORWARD, Capture, Edit, Point, Recorder, edit_hooks, hooks_installed, model_device,
                      select_points, t2t_module_points)
from .models import T2TViT

__all__ = ['PAPER_NOTEBOOK', 'NOTEBOOK_ANALOGUE', 'PROCEDURES', 'procedure_of', 'describe', 'notebook_input',
           'notebook_points', 'run_notebook', 'main_path_convs', 'check_supported']

PAPER_NOTEBOOK = 'paper_notebook'  # as the released notebooks did it (ResNet, ViT)
NOTEBOOK_ANALOGUE = 'notebook_analogue'  # our analogue for T2T-ViT, whose notebook was not released
PROCEDURES = (REAL_FORWARD, PAPER_NOTEBOOK)  # what a user chooses; T2T-ViT's notebook run is the analogue

_DESCRIPTIONS = {
    REAL_FORWARD: 'real forward pass (normalized input, every module, class token and positions)',
    PAPER_NOTEBOOK: "as the paper's notebooks: [0, 1] input without normalization, modules chained by hand",
    NOTEBOOK_ANALOGUE: "our analogue of the paper's notebooks (none was released for T2T-ViT): [0, 1] input, "
                       'T2T module then blocks, no class token or position table',
}


def procedure_of(model: nn.Module, procedure: str) -> str:
    """The procedure a model really gets: the notebook procedure of a T2T-ViT is our analogue."""
    if procedure not in PROCEDURES + (NOTEBOOK_ANALOGUE,):
        raise ValueError(f'procedure must be one of {PROCEDURES}, not {procedure!r}')
    if procedure != REAL_FORWARD and isinstance(model, T2TViT):
        return NOTEBOOK_ANALOGUE
    return PAPER_NOTEBOOK if procedure == NOTEBOOK_ANALOGUE else procedure


def describe(procedure: str) -> str:
    return _DESCRIPTIONS[procedure]


def notebook_input(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [0, 1]: a square bilinear resize, no crop, no mean/std (the notebooks' transform)."""
    arrays = [np.asarray(image.convert('RGB').resize((size, size), Image.BILINEAR), dtype=np.float32)
              for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


_MAIN_PATH_CONV = re.compile(r'conv1(\.\d+)?|layer\d+\.\d+\.conv\d+')  # the stem (deep stems too), block convs


def _family(model: nn.Module) -> str:
    """'t2t', 'vit' or 'resnet': the families the notebook procedure is defined for; ValueError otherwise."""
    if isinstance(model, T2TViT):
        return 't2t'
    if isinstance(model, VisionTransformer):
        return 'vit'
    if all(hasattr(model, name) for name in ('conv1', 'layer1', 'layer4')):
        return 'resnet'
    raise ValueError(f"the paper's notebook procedure is defined for ResNets, ViTs and T2T-ViT, not for "
                     f'{type(model).__name__}; use the real forward pass')


def check_supported(model: nn.Module) -> None:
    """Raise a one-line ValueError when the notebook procedure is not defined for this model's family."""
    _family(model)


def main_path_convs(model: nn.Module) -> List[tuple]:
    """(name, Conv2d) of a ResNet's main path in definition order: the stem conv(s) and each block's own
    ``convN``; no downsample branch, and no conv inside a block's attention (squeeze-excitation) module."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Conv2d) and _MAIN_PATH_CONV.fullmatch(name)]


def notebook_points(model: nn.Module, height: int, width: int) -> List[Point]:
    """The layers the notebook procedure records, with the real forward pass's labels."""
    family = _family(model)
    if family == 't2t':
        grid = model.token_grid(height, width)
        return t2t_module_points(model, height, width) + [
            Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_map(grid)) for i in range(len(model.blocks))]
    if family == 'vit':
        grid = tuple(model.patch_embed.dynamic_feat_size((height, width)))
        return [Point('patch_embed', 'patch_embed', 'patch tokens', _tokens_map(grid))] + [
            Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_map(grid)) for i in range(len(model.blocks))]
    return [Point(name, 'conv', f'conv{i + 1}', _identity) for i, (name, _) in enumerate(main_path_convs(model))]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _tokens_map(grid) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(tokens: torch.Tensor) -> torch.Tensor:  # (B, N, C) without class token -> (B, C, h, w)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
    return convert


def _chain_convs(model: nn.Module, x: torch.Tensor, record: Callable[[str, torch.Tensor], bool]) -> None:
    for name, conv in main_path_convs(model):
        if conv.in_channels != x.shape[1]:
            raise ValueError(f'{name} takes {conv.in_channels} channels but the previous conv gives {x.shape[1]}: '
                             'the notebook chain does not apply to this model')
        x = conv(x)  # (B, C, H, W), nothing between the convs
        if record(name, x):
            return


def _patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) patch tokens: the embedding alone, no class token, no position embedding."""
    tokens = model.patch_embed(x)
    if tokens.ndim == 4:  # NHWC output of dynamic_img_size models
        tokens = tokens.flatten(1, 2)
    return tokens


def _chain_blocks(model: nn.Module, x: torch.Tensor, record: Callable[[str, torch.Tensor], bool]) -> None:
    if isinstance(model, T2TViT):
        names = iter(('soft_split0', 'attention1', 'soft_split1', 'attention2', 'soft_split2', 'project'))
        stages = _RecordingList(lambda stage: record('tokens_to_token.' + next(names), stage.tokens))
        tokens = model.tokens_to_token(x, stages)  # (B, N, C): input stage is skipped by _RecordingList
        if stages.stopped:
            return
    else:
        tokens = _patch_tokens(model, x)
        if record('patch_embed', tokens):
            return
    for i, block in enumerate(model.blocks):
        tokens = block(tokens)  # (B, N, C), never a class token
        if record(f'blocks.{i}', tokens):
            return


class _RecordingList(list):
    """Receives the T2T module's stages; records each (but the input) and remembers whether to stop."""

    def __init__(self, record: Callable[[Any], bool]):
        super().__init__()
        self._record, self.stopped = record, False

    def append(self, stage) -> None:
        if stage.name != 'input' and not self.stopped:
            self.stopped = self._record(stage)


def run_notebook(
        model: nn.Module,
        x: torch.Tensor,
        dtype: torch.dtype = torch.float32,
        max_side: Optional[int] = None,
        layers: Optional[Collection[str]] = None,
        keep_maps: bool = True,
        reduce: Optional[Callable[[torch.Tensor], Any]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        edits: Sequence[Edit] = (),
) -> List[Capture]:
    """The notebook procedure on ``x`` (B, 3, H, W) from :func:`notebook_input`; one Capture per image.

    Options as in :func:`t2t_viz.capture.run`. The chain stops after the last requested layer. There are
    no logits: the notebooks never reached the classifier.
    """
    B, _, height, width = x.shape
    points = select_points(notebook_points(model, height, width), layers)
    procedure = procedure_of(model, PAPER_NOTEBOOK)
    recorder = Recorder(points, dtype, max_side, keep_maps, reduce, progress)
    by_name: Dict[str, Point] = {p.module_name: p for p in points}
    last = points[-1].module_name if points else None

    def record(name: str, output: torch.Tensor) -> bool:
        if name in by_name:
            recorder.record(by_name[name], output)
        return name == last

    with hooks_installed(recorder, edit_hooks(model, recorder, edits)), torch.inference_mode():
        x = x.to(model_device(model))
        if points:
            if _family(model) in ('t2t', 'vit'):
                _chain_blocks(model, x, record)
            else:
                _chain_convs(model, x, record)
    return recorder.captures(None, x, procedure)
