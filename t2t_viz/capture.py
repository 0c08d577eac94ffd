"""One forward pass -> every inspectable layer as a (C, H, W) feature map, its statistics, or both.

Hooks are registered per call and always removed (``finally``). A model is shared by many sessions, so
each call publishes its recorder in a ContextVar, and a hook records only when the forward pass runs in
the context of the call that registered it. Two threads capturing the same model at once therefore each
get only their own activations.

What is kept is asked for explicitly (``layers``, ``keep_maps``, ``dtype``, ``max_side``): a capture at
2048x2048 keeps gigabytes when every full map is kept, so statistics can be reduced from the full map
inside the hook (``reduce``) while only a small display copy, or nothing, is kept.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .allocator import display_buffers
from .models import T2TViT

__all__ = ['Layer', 'Capture', 'Point', 'Recorder', 'run', 'layer_points', 'select_points', 't2t_module_points',
           'intermediate_points', 'intermediate_count', 'pooled_size', 'model_device', 'hooked_pass', 'hook_owner',
           'hooks_installed', 'edit_hooks', 'Edit',
           'StopForward', 'FLOAT16_MAX', 'REAL_FORWARD']

REAL_FORWARD = 'real_forward'
FLOAT16_MAX = 65504.0  # kept float16 maps are clamped to this magnitude instead of overflowing to inf

_hook_owner: contextvars.ContextVar[Optional[object]] = contextvars.ContextVar('t2t_viz_hook_owner', default=None)
_hook_registry_lock = threading.Lock()  # registering/removing hooks mutates the shared module's dicts


@dataclass
class Layer:
    """One captured layer output for one image."""
    name: str  # module path, stable across runs (e.g. 'layer2.1.act2', 'blocks.11')
    kind: str  # 'stem' | 'relu' | 'conv' | 'stage' | 'patch_embed' | 'soft_split' | 'restructurization'
    #           | 'projection' | 'block' | 'mlp_hidden' | 'intermediate'
    depth: int  # 0-based position in the model's layer order
    fmap: Optional[torch.Tensor]  # (C, h, w) as kept: the full map, an average-pooled copy, or None
    label: str = ''  # human name: 'conv25', 'block 12', 'soft split 1'
    shape: Optional[Tuple[int, int, int]] = None  # (C, H, W) of the full map; defaults to fmap's shape
    stats: Any = None  # what the capture's ``reduce`` returned for this layer and image

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = tuple(self.fmap.shape)

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def height(self) -> int:
        return self.shape[1]

    @property
    def width(self) -> int:
        return self.shape[2]

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def pooled(self) -> bool:
        """Whether the kept map is a smaller, average-pooled copy of the full map."""
        return self.fmap is not None and tuple(self.fmap.shape[1:]) != (self.height, self.width)


@dataclass
class Capture:
    """Everything one forward pass showed about one image."""
    layers: List[Layer]
    logits: Optional[torch.Tensor]  # (num_classes,); None when the pass stopped early
    input: Optional[torch.Tensor]  # (3, H, W), preprocessed; None when maps are not kept
    procedure: str = REAL_FORWARD

    def layer(self, name_or_label: str) -> Layer:
        for layer in self.layers:
            if name_or_label in (layer.name, layer.label):
                return layer
        raise KeyError(f'no layer named {name_or_label!r}')


@dataclass
class Point:
    """A place in a model whose output becomes a layer record."""
    module_name: str
    kind: str
    label: str
    to_map: Callable[[torch.Tensor], torch.Tensor]  # module output -> (B, C, H, W)
    written_later: bool = True  # False only where the model is known never to modify this output in place
    prefix: int = 0  # leading tokens of a (B, N, C) output that are not on the grid (class, register tokens)
    repeats_previous: bool = False  # the output may be the previous point's output itself, unchanged since


def _host(tensor: torch.Tensor) -> str:
    """Where kept tensors live: the CPU, or the meta device when memory estimation runs this code shape-only."""
    return 'meta' if tensor.is_meta else 'cpu'


class StopForward(Exception):
    """Raised from a hook of :func:`hooked_pass` once everything asked for is recorded: the pass ends there."""


def hook_owner() -> Optional[object]:
    """The owner of the :func:`hooked_pass` running in this context; a hook records only for its own owner."""
    return _hook_owner.get()


def hooked_pass(model: nn.Module, x: torch.Tensor, owner: object, hooks: Sequence[Tuple[nn.Module, Callable]],
                pre: bool = False) -> Optional[torch.Tensor]:
    """One inference pass of ``x`` with ``hooks`` (forward hooks, or pre-hooks when ``pre``) on ``model``'s modules.

    ``owner`` is :func:`hook_owner` during the pass, so hooks can ignore passes of other callers through the
    same shared modules. Hooks are registered and removed under one lock, and always removed. Returns the
    model's output, or None when a hook raised :class:`StopForward`.
    """
    try:
        with hooks_installed(owner, hooks, pre), torch.inference_mode():
            return model(x.to(model_device(model)))
    except StopForward:
        return None


@contextlib.contextmanager
def hooks_installed(owner: object, hooks: Sequence[Tuple[nn.Module, Callable]], pre: bool = False) -> Iterator[None]:
    """``hooks`` (forward hooks, or pre-hooks when ``pre``) on their modules for the ``with`` block, with
    ``owner`` as :func:`hook_owner` in this context. Registered and removed under one lock, always removed."""
    handles = []
    token = _hook_owner.set(owner)
    try:
        with _hook_registry_lock:
            for module, hook in hooks:
                handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
        yield
    finally:
        _hook_owner.reset(token)
        with _hook_registry_lock:
            for handle in handles:
                handle.remove()


class _Room(NamedTuple):
    """Where one kept copy goes: values [first, first + size) of the pass's buffer, or ``tensor``, a buffer of
    its own."""
    first: int
    shape: Tuple[int, ...]
    tensor: Optional[torch.Tensor]


class Recorder:
    """Turns outputs at known points into per-image layer records: reduced in place, kept as asked.

    ``reduce(fmap, prefix)`` gets each image's full (C, H, W) map and its (P, C) prefix tokens (None for
    points without them), or a batch's (B, C, H, W) maps and (B, P, C) prefix tokens at once when it has a
    ``batch(fmaps, prefixes)`` method (returning a list); a ``reduce`` with a ``for_point(point)`` method gives
    the function for each point. A reduce whose ``writes_float16`` is true is also given the room for a
    float32 host map's whole float16 copy, as a (B, C, H, W) int16 array, third argument of ``batch``: an
    image whose result has a true ``copied_float16`` was copied there as the reduce read it.
    A point known to repeat the previous point's output (a timm ResNet stage's output is its last ReLU's
    output, untouched in between) reuses that reduction and that kept map when it is the very same tensor.

    Copies are views of one buffer for the whole pass when ``copy_elements`` (how many values an earlier
    pass of the same layers and input copied) is given, else each in a buffer of its own; ``copied`` counts
    this pass's. (A buffer of its own cost each copy about 30 us in the hooks of a pass, where Python runs
    on caches the forward has just evicted: 1.5 ms of a ResNet50 pass at 224.)
    """

    def __init__(self, points: Sequence[Point], dtype: torch.dtype = torch.float32, max_side: Optional[int] = None,
                 keep_maps: bool = True, reduce: Optional[Callable[[torch.Tensor], Any]] = None,
                 progress: Optional[Callable[[int, int], None]] = None, stop_after: Optional[str] = None,
                 copy_elements: int = 0):
        self.points = {p.module_name: p for p in points}
        self.dtype, self.max_side, self.keep_maps, self.reduce = dtype, max_side, keep_maps, reduce
        for_point = getattr(reduce, 'for_point', None)
        reducers = {p.module_name: for_point(p) if for_point else reduce for p in points} if reduce else {}
        self._reducers = {name: _batch_reduce(each) for name, each in reducers.items()}  # found once, not in hooks
        self._float16_writers = {name for name, each in reducers.items()
                                 if dtype is torch.float16 and keep_maps and getattr(each, 'writes_float16', False)}
        self.progress, self.stop_after = progress, stop_after
        # a kept copy is a tensor, or a room whose tensor is made after the pass; _last: output, reduction, copy
        self.outputs: List[Tuple[Point, Tuple[int, int, int], Union[torch.Tensor, _Room, None], List[Any]]] = []
        self._last: Optional[Tuple[weakref.ref, List[Any], Union[torch.Tensor, _Room, None]]] = None
        self.copied = 0  # values copied so far in this pass
        self._copy_elements = copy_elements
        self._copies: Optional[torch.Tensor] = None  # (copy_elements,) the pass's one buffer, made at the first copy
        self._copies_bits: Optional[np.ndarray] = None  # its int16 view, for a float16 buffer

    def _reduced(self, point: Point, output: torch.Tensor, fmap: torch.Tensor, room: Optional[_Room]) -> List[Any]:
        reduce = self._reducers.get(point.module_name)
        if reduce is None:
            return [None] * fmap.shape[0]
        prefix = output[:, :point.prefix] if point.prefix else None  # (B, P, C)
        if room is None:
            return reduce(fmap, prefix)
        return reduce(fmap, prefix, self._room_bits(room))

    def record(self, point: Point, output: torch.Tensor) -> None:
        fmap = point.to_map(output)  # (B, C, H, W)
        last = self._last
        if point.repeats_previous and last is not None and last[0]() is output:
            reduced, kept = last[1], last[2]  # the previous point's very output, unchanged since: same records
        else:
            room = self._float16_room(point, fmap)
            reduced = self._reduced(point, output, fmap, room)
            kept = None
            if room is not None and all(getattr(image, 'copied_float16', False) for image in reduced):
                kept = room  # the reduce wrote the copy as it read the map
            elif self.keep_maps:
                shares_output = fmap is output \
                    or fmap.untyped_storage().data_ptr() == output.untyped_storage().data_ptr()
                kept = self._keep(fmap, shares_output and point.written_later, reduced, room)
        self._last = (weakref.ref(output), reduced, kept)
        self.outputs.append((point, tuple(fmap.shape[1:]), kept, reduced))
        if self.progress:
            self.progress(len(self.outputs), len(self.points))
        if point.module_name == self.stop_after:
            raise StopForward

    def _float16_room(self, point: Point, fmap: torch.Tensor) -> Optional[_Room]:
        """Room for the float16 copy of ``fmap`` (B, C, H, W) that the point's reduce can write as it reads the
        map (a float32 host map kept whole), else None."""
        if point.module_name not in self._float16_writers or fmap.dtype is not torch.float32 or not fmap.is_cpu \
                or fmap.requires_grad:
            return None
        shape = fmap.shape
        if self.max_side and max(shape[2], shape[3]) > self.max_side:
            return None  # pooled for display
        return self._room(tuple(shape))

    def _keep(self, fmap: torch.Tensor, must_copy: bool, reduced: List[Any], room: Optional[_Room] = None
              ) -> torch.Tensor:
        """The copy of ``fmap`` (B, C, H, W) to keep: pooled to ``max_side``, in ``dtype``, on the host (in
        ``room`` when given); the map itself where it needs neither (then ``must_copy`` says whether later
        in-place ops could change it)."""
        if fmap.requires_grad:
            fmap = fmap.detach()
        batch, channels, height, width = fmap.shape
        size = pooled_size(height, width, self.max_side) if self.max_side else (height, width)
        pooled = size != (height, width)
        if not (pooled or must_copy or fmap.dtype != self.dtype or not (fmap.is_cpu or fmap.is_meta)):
            return fmap  # rebuilt from tokens, or a module output nothing writes to later: kept as it is
        shape = (batch, channels, *size)
        if fmap.is_meta:  # shape-only (memory estimation): the copy's bytes
            return torch.empty(shape, dtype=self.dtype, device='meta')
        # copies go to reused host buffers: fresh memory for every pass cost page faults and split the heap
        kept = self._room_tensor(room or self._room(shape))
        if pooled and kernels.average_pool(fmap, size, out=kept) is not None:
            return kept  # pooled in place; float16 averages are clamped to its range by the kernel
        source = F.adaptive_avg_pool2d(fmap.float(), size) if pooled else fmap
        kept.copy_(source if source.is_cpu else source.to(self.dtype))  # is_cpu: device.type cost 6 us here
        if self.dtype == torch.float16 and not _within_float16(reduced) and _beyond_float16(kept):
            kept.clamp_(-FLOAT16_MAX, FLOAT16_MAX)  # values beyond float16's range became inf
        return kept

    def _room(self, shape: Tuple[int, ...]) -> _Room:
        """Room for one copy of ``shape`` in the kept dtype, uninitialised: in the pass's buffer where it fits."""
        first, self.copied = self.copied, self.copied + math.prod(shape)
        if self._copies is None and self._copy_elements:
            self._copies = display_buffers.empty((self._copy_elements,), self.dtype)
            if self.dtype is torch.float16:
                self._copies_bits = self._copies.view(torch.int16).numpy()
        if self._copies is not None and self.copied <= self._copies.shape[0]:
            return _Room(first, shape, None)  # its tensor is made when needed: after the pass, for a written copy
        return _Room(first, shape, display_buffers.empty(shape, self.dtype))

    def _room_tensor(self, room: _Room) -> torch.Tensor:
        """The contiguous host tensor of ``room``."""
        if room.tensor is not None:
            return room.tensor
        return self._copies[room.first:room.first + math.prod(room.shape)].view(room.shape)

    def _room_bits(self, room: _Room) -> np.ndarray:
        """The int16 NumPy view of a float16 ``room``, made without a PyTorch call where it lies in the pass's
        buffer (in a hook, each cost microseconds on caches the forward pass has just evicted)."""
        if room.tensor is not None:
            return room.tensor.view(torch.int16).numpy()
        return self._copies_bits[room.first:room.first + math.prod(room.shape)].reshape(room.shape)

    def captures(self, logits: Optional[torch.Tensor], x: torch.Tensor, procedure: str = REAL_FORWARD) -> List[Capture]:
        """One Capture per image of the batch ``x`` (B, 3, H, W), layers in the order they were recorded."""
        outputs = [(point, shape, self._room_tensor(kept) if isinstance(kept, _Room) else kept, reduced)
                   for point, shape, kept, reduced in self.outputs]
        captures = []
        for i in range(x.shape[0]):
            layers = [Layer(point.module_name, point.kind, depth, None if kept is None else kept[i], point.label,
                            shape, reduced[i])
                      for depth, (point, shape, kept, reduced) in enumerate(outputs)]
            image_logits = None if logits is None else logits[i].float().to(_host(logits))
            image = x[i].to(_host(x), torch.float16) if self.keep_maps else None
            captures.append(Capture(layers, image_logits, image, procedure))
        return captures


def _batch_reduce(reduce: Callable[..., Any]) -> Callable[[torch.Tensor, Optional[torch.Tensor]], List[Any]]:
    """``reduce`` for a (B, C, H, W) batch and its (B, P, C) prefix tokens (or None): its own ``batch`` method
    where it has one, else ``reduce`` called for each image."""
    batch = getattr(reduce, 'batch', None)
    if batch is not None:
        return batch

    def each_image(fmap: torch.Tensor, prefix: Optional[torch.Tensor]) -> List[Any]:
        return [reduce(fmap[i], None if prefix is None else prefix[i]) for i in range(fmap.shape[0])]
    return each_image


def _within_float16(reduced: List[Any]) -> bool:
    """Whether every image's reduction says its map's |x| is within float16's range (a ``largest_magnitude``,
    as :class:`t2t_viz.stats.LayerStats` gives), so that the float16 copy need not be read to find out."""
    return all(float(getattr(image, 'largest_magnitude', math.inf)) <= FLOAT16_MAX for image in reduced)


def _beyond_float16(kept: torch.Tensor) -> bool:
    """Whether a float16 copy holds an infinity (or a NaN, which clamping keeps): one read of the copy, where
    clamping it in place costs a read and a write of every value."""
    low, high = torch.aminmax(kept)
    return not (float(high) <= FLOAT16_MAX and float(low) >= -FLOAT16_MAX)


def _tokens_to_map(grid: Tuple[int, int], prefix: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, prefix:]  # (B, N, C) without class/prefix tokens
        B, N, C = tokens.shape
        assert N == grid[0] * grid[1], f'{N} tokens do not fit the {grid} grid'
        return tokens.transpose(1, 2).reshape(B, C, *grid)
    return convert


def _identity_map(x: torch.Tensor) -> torch.Tensor:
    return x


def _resnet_points(model: nn.Module) -> List[Point]:
    """The stem ReLU, every main-path ReLU, and each stage's output right after the stage's last ReLU: the
    order in which the forward pass produces them (``named_modules`` lists a stage before its blocks)."""
    written_later = not _is_standard_timm_resnet(model)
    points: List[Point] = []
    stage: Optional[Point] = None
    conv_number = 0
    for name, module in model.named_modules():
        if stage is not None and not name.startswith(stage.module_name + '.'):
            points.append(stage)  # the stage's modules are all listed: its output comes next
            stage = None
        if isinstance(module, nn.ReLU) and (name == 'act1' or re.fullmatch(r'layer\d+\.\d+\.act\d+', name)):
            conv_number += 1  # every ReLU on the main path follows exactly one conv
            kind = 'stem' if name == 'act1' else 'relu'
            points.append(Point(name, kind, f'conv{conv_number}', _identity_map, written_later))
        elif re.fullmatch(r'layer\d+', name):
            stage = Point(name, 'stage', name, _identity_map, written_later, repeats_previous=not written_later)
    if stage is not None:
        points.append(stage)
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


def _vit_points(model: nn.Module, grid: Tuple[int, int], mlp_hidden: bool) -> List[Point]:
    prefix = getattr(model, 'num_prefix_tokens', 1)
    points = [Point('patch_embed', 'patch_embed', 'patch tokens', _patch_embed_map(grid))]
    for i in range(len(model.blocks)):
        if mlp_hidden:
            points.append(Point(f'blocks.{i}.mlp.act', 'mlp_hidden', f'block {i + 1} MLP',
                                _tokens_to_map(grid, prefix), prefix=prefix))
        points.append(Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_to_map(grid, prefix), prefix=prefix))
    return points


def _patch_embed_map(grid: Tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4 and x.shape[-1] != grid[1]:  # NHWC output (dynamic_img_size)
            return x.permute(0, 3, 1, 2)
        if x.ndim == 4:
            return x
        return _tokens_to_map(grid, 0)(x)
    return convert


def t2t_module_points(model: T2TViT, height: int, width: int) -> List[Point]:
    """The six Tokens-to-Token steps: three soft splits, two restructurizations, the projection."""
    grid1, grid2, grid3 = model.tokens_to_token.grid_sizes(height, width)
    t2t = 'tokens_to_token.'
    return [
        Point(t2t + 'soft_split0', 'soft_split', 'soft split 1', _tokens_to_map(grid1, 0)),
        Point(t2t + 'attention1', 'restructurization', 'restructurization 1', _tokens_to_map(grid1, 0)),
        Point(t2t + 'soft_split1', 'soft_split', 'soft split 2', _tokens_to_map(grid2, 0)),
        Point(t2t + 'attention2', 'restructurization', 'restructurization 2', _tokens_to_map(grid2, 0)),
        Point(t2t + 'soft_split2', 'soft_split', 'soft split 3', _tokens_to_map(grid3, 0)),
        Point(t2t + 'project', 'projection', 'T2T tokens', _tokens_to_map(grid3, 0)),
    ]


def _t2t_points(model: T2TViT, height: int, width: int, mlp_hidden: bool) -> List[Point]:
    grid = model.token_grid(height, width)
    points = t2t_module_points(model, height, width)
    for i in range(len(model.blocks)):
        if mlp_hidden:
            points.append(Point(f'blocks.{i}.mlp.act', 'mlp_hidden', f'block {i + 1} MLP', _tokens_to_map(grid, 1),
                                prefix=1))
        points.append(Point(f'blocks.{i}', 'block', f'block {i + 1}', _tokens_to_map(grid, 1), prefix=1))
    return points


def layer_points(model: nn.Module, height: int, width: int, mlp_hidden: bool = False) -> Optional[List[Point]]:
    """The hook points of a known model family, or None (then forward_intermediates is used)."""
    if isinstance(model, T2TViT):
        return _t2t_points(model, height, width, mlp_hidden)
    if hasattr(model, 'blocks') and hasattr(model, 'patch_embed') and hasattr(model.patch_embed, 'dynamic_feat_size'):
        return _vit_points(model, tuple(model.patch_embed.dynamic_feat_size((height, width))), mlp_hidden)
    if hasattr(model, 'layer1') and hasattr(model, 'act1'):
        return _resnet_points(model)
    return None


_Edge = Tuple[Optional[nn.Module], str, nn.Module]  # (parent, name, child): parent._modules[name] is child
_targets: 'weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[List[Point], Dict[str, nn.Module], List[_Edge]]]]' \
    = weakref.WeakKeyDictionary()
_targets_lock = threading.Lock()


def _hook_targets(model: nn.Module, height: int, width: int, mlp_hidden: bool
                  ) -> Optional[Tuple[List[Point], Dict[str, nn.Module]]]:
    """:func:`layer_points` and the module of each, found once per model and input size (walking a model's
    modules took 1-2 ms of every pass); found again when a point's module is no longer the model's."""
    key = (height, width, mlp_hidden)
    with _targets_lock:
        cached = _targets.get(model, {}).get(key)
    if cached is not None and all((model if parent is None else parent)._modules.get(name) is child
                                  for parent, name, child in cached[2]):
        return cached[0], cached[1]
    points = layer_points(model, height, width, mlp_hidden)
    if points is None:
        return None
    modules = dict(model.named_modules())
    missing = [p.module_name for p in points if p.module_name not in modules]
    if missing:
        raise ValueError(f'model has no modules {missing[:3]} to capture')
    found = points, {p.module_name: modules[p.module_name] for p in points}
    with _targets_lock:
        _targets.setdefault(model, {})[key] = (*found, _edges(model, modules, found[1]))
    return found


def _edges(model: nn.Module, modules: Dict[str, nn.Module], targets: Dict[str, nn.Module]) -> List[_Edge]:
    """Every (parent, name, child) step on the paths from ``model`` to ``targets``: while each parent still
    holds the same child under that name, no target was replaced or removed (checking that is one dictionary
    lookup a step, where ``get_submodule`` for every target cost a pass 0.26 ms on ResNet50). The model
    itself is None: the cache keys it weakly, so its entry must not hold it."""
    steps: Dict[str, _Edge] = {}
    for path in targets:
        parent, prefix = None, ''
        for name in path.split('.'):
            prefix = f'{prefix}.{name}' if prefix else name
            child = modules[prefix]
            steps.setdefault(prefix, (parent, name, child))
            parent = child
    return list(steps.values())


def select_points(points: List[Point], wanted: Optional[Collection[str]]) -> List[Point]:
    """The points named (module path or label) in ``wanted``, in model order; all when ``wanted`` is None."""
    if wanted is None:
        return points
    wanted = set(wanted)
    chosen = [p for p in points if p.module_name in wanted or p.label in wanted]
    found = {p.module_name for p in chosen} | {p.label for p in chosen}
    unknown = sorted(w for w in wanted if w not in found)
    if unknown:
        names = ', '.join(p.label for p in points[:6])
        raise ValueError(f'no layers {unknown} in this model (labels such as {names}, ...)')
    return chosen


def _hook(owner: Recorder, point: Point, module: nn.Module, inputs, output) -> None:
    if _hook_owner.get() is owner:  # else a hook of another capture, or a forward pass of another caller
        owner.record(point, output)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run(
        model: nn.Module,
        x: torch.Tensor,
        mlp_hidden: bool = False,
        dtype: torch.dtype = torch.float32,
        max_side: Optional[int] = None,
        layers: Optional[Collection[str]] = None,
        keep_maps: bool = True,
        reduce: Optional[Callable[[torch.Tensor], Any]] = None,
        progress: Optional[Callable[[int, int], None]] = None,
        stop_early: bool = False,
        edits: Sequence['Edit'] = (),
) -> List[Capture]:
    """Run ``x`` (B, 3, H, W) through ``model`` once; one Capture per image, layers in forward order.

    Args:
        layers: module paths or labels to record (default: every layer of the model).
        keep_maps: keep each map (else only ``reduce``'s results and shapes are kept).
        dtype: dtype of kept maps (``torch.float16`` halves them; values beyond its range are clamped).
        max_side: keep average-pooled copies no larger than this (for display; ``reduce`` sees full maps).
        reduce: called as ``reduce(fmap, prefix)`` on every full (C, H, W) map of every image inside the hook,
            with the (P, C) prefix tokens of token layers (else None); its result is ``Layer.stats``. It must
            not keep the map. A ``batch`` method, where it has one, takes the whole batch instead (see
            :class:`Recorder`).
        progress: called with (layers recorded, layers to record) as the pass goes.
        stop_early: stop the pass after the last requested layer (logits are then None).
        edits: changes to module outputs during this pass only (see :class:`Edit`); a recorded layer shows
            its module's edited output.
    """
    B, _, height, width = x.shape
    targets = _hook_targets(model, height, width, mlp_hidden)
    if targets is None:
        if edits:
            raise ValueError(f'{type(model).__name__} is captured through forward_intermediates, whose stages '
                             'cannot be edited in the pass')
        return _run_intermediates(model, x, dtype, max_side, layers, keep_maps, reduce, progress, stop_early)
    points, modules = targets
    points = select_points(points, layers)
    copies_key = (tuple(x.shape), dtype, max_side, tuple(p.module_name for p in points), stop_early)
    recorder = Recorder(points, dtype, max_side, keep_maps, reduce, progress,
                        stop_after=points[-1].module_name if stop_early and points else None,
                        copy_elements=_copied_before(model, copies_key) if keep_maps else 0)
    hooks = [(modules[p.module_name], functools.partial(_hook, recorder, p)) for p in points]
    logits = hooked_pass(model, x, recorder, edit_hooks(model, recorder, edits) + hooks)
    if recorder.copied:
        with _targets_lock:
            _copied.setdefault(model, {})[copies_key] = recorder.copied
    return recorder.captures(logits, x)


_copied: 'weakref.WeakKeyDictionary[nn.Module, Dict[tuple, int]]' = weakref.WeakKeyDictionary()  # values kept


def _copied_before(model: nn.Module, key: tuple) -> int:
    """How many values the last pass of ``model`` with the same input shape, layers and options copied (0 for
    the first): the size of the next such pass's one buffer for its copies."""
    with _targets_lock:
        return _copied.get(model, {}).get(key, 0)


@dataclass(frozen=True)
class Edit:
    """A change to one module's output during one pass: ``change(output)`` returns the output to use instead
    (a new tensor; the module's own output is never written to)."""
    module_name: str
    change: Callable[[torch.Tensor], torch.Tensor]


def _edit_hook(owner: object, change: Callable[[torch.Tensor], torch.Tensor], module: nn.Module, inputs,
               output) -> Optional[torch.Tensor]:
    if hook_owner() is not owner:
        return None  # another caller's pass through the shared module
    return change(output)


def edit_hooks(model: nn.Module, owner: object, edits: Sequence[Edit]) -> List[Tuple[nn.Module, Callable]]:
    """Forward hooks that apply ``edits`` in passes owned by ``owner``; install them before recording hooks
    of the same modules, so that what is recorded is the edited output."""
    if not edits:
        return []  # walking the modules costs a pass a few tenths of a millisecond
    modules: Dict[str, nn.Module] = dict(model.named_modules())
    missing = [edit.module_name for edit in edits if edit.module_name not in modules]
    if missing:
        raise ValueError(f'model has no modules {missing} to edit')
    return [(modules[edit.module_name], functools.partial(_edit_hook, owner, edit.change)) for edit in edits]


def intermediate_points(count: int) -> List[Point]:
    """The layers of a model captured through timm's ``forward_intermediates``: its ``count`` stages."""
    return [Point(f'intermediates.{i}', 'intermediate', f'stage {i + 1}', _identity_map) for i in range(count)]


def intermediate_count(model: nn.Module) -> int:
    """How many maps ``forward_intermediates`` returns for this model: one per entry of timm's feature_info."""
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(f'{type(model).__name__}: layers are known only after a forward pass')
    return len(info)


def _run_intermediates(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, max_side: Optional[int],
                       layers: Optional[Collection[str]], keep_maps: bool, reduce: Optional[Callable[..., Any]],
                       progress: Optional[Callable[[int, int], None]], stop_early: bool) -> List[Capture]:
    """Any other timm model: its own forward_intermediates gives the maps, forward_head the logits.

    The options mean what they mean for hooked models; the maps arrive together when the pass ends, so
    progress is reported then, and ``stop_early`` ends the pass after the last stage asked for.
    """
    if not hasattr(model, 'forward_intermediates'):
        raise ValueError(f'{type(model).__name__} has no forward_intermediates and no known layer layout')
    points = None if layers is None else select_points(intermediate_points(intermediate_count(model)), layers)
    indices = None if points is None else [int(p.module_name.split('.')[1]) for p in points]
    stop_early = stop_early and indices is not None
    with torch.inference_mode():
        output = model.forward_intermediates(x.to(model_device(model)), indices=indices, stop_early=stop_early,
                                             intermediates_only=stop_early)
        if stop_early:
            intermediates, logits = output, None
        else:
            final, intermediates = output
            logits = model.forward_head(final)
    points = points or intermediate_points(len(intermediates))
    recorder = Recorder(points, dtype, max_side, keep_maps, reduce, progress)
    for point, intermediate in zip(points, intermediates):
        recorder.record(point, intermediate)
    return recorder.captures(logits, x)


def pooled_size(height: int, width: int, max_side: int) -> Tuple[int, int]:
    """The (h, w) a map of (height, width) is kept at under ``max_side`` (aspect ratio kept)."""
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))
