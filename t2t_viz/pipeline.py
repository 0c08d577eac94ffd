"""Image in, everything the app and CLI show out: layers, flags, T2T stages and top-5 classes."""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from timm.data import ImageNetInfo

from . import attention, capture, memory, procedures, zoo
from .images import denormalize, preprocess_batch
from .stats import LayerSummary, StatisticsReduce, Thresholds, layer_stats, summarize
from .zoo import LoadedModel, WeightsInfo

__all__ = ['ModelResult', 'inspect_images', 'run_batch', 'memory_estimate', 'display_estimate', 'rollout_estimate',
           'layer_labels', 'capture_points', 'top_k', 'class_name', 'input_transform', 'DISPLAY_SIDE', 'DISPLAY_DTYPE']

DISPLAY_SIDE = 128  # kept display maps are average-pooled to at most this many pixels a side
DISPLAY_DTYPE = torch.float16  # display maps only: statistics are reduced from the full float32 maps


@dataclass
class ModelResult:
    """One model's view of one image, by one procedure."""
    model: str  # the name as asked for, pretrained tag included when one was given
    weights: WeightsInfo
    capture: capture.Capture
    summaries: List[LayerSummary]
    top5: List[Tuple[str, float]]  # (class description, probability); empty when the procedure has no logits
    normalization: Tuple[Tuple[float, ...], Tuple[float, ...]] = ((0.0,) * 3, (1.0,) * 3)  # (mean, std) of the input

    @property
    def procedure(self) -> str:
        return self.capture.procedure

    def seen_image(self) -> Image.Image:
        """The exact input of the pass as an RGB image (after the model's resize and centre crop): every map
        lies on this image, so overlays are drawn on it, never on the uploaded photo."""
        if self.capture.input is None:
            raise ValueError('this result kept no input (a statistics-only run)')
        return denormalize(self.capture.input, *self.normalization)

    def rows(self, image_name: str) -> List[dict]:
        return [s.row(image_name, self.model, self.weights.label, self.procedure) for s in self.summaries]


@lru_cache(maxsize=1)
def _imagenet() -> ImageNetInfo:
    return ImageNetInfo()


def class_name(index: int, classes: int) -> str:
    """The ImageNet description of class ``index`` of a 1000-class head, else 'class N'."""
    return _imagenet().index_to_description(index) if classes == 1000 else f'class {index}'


def top_k(logits: Optional[torch.Tensor], k: int = 5) -> List[Tuple[str, float]]:
    if logits is None:
        return []
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(k, probs.numel()))
    return [(class_name(i, probs.numel()), float(v)) for v, i in zip(values.tolist(), indices.tolist())]


def input_transform(loaded: LoadedModel, procedure: str = capture.REAL_FORWARD
                    ) -> Tuple[Tuple, Callable[[Image.Image], torch.Tensor]]:
    """(key, transform): how ``procedure`` turns one image into the (3, H, W) input of this model. Models
    whose transforms have the same key share their inputs."""
    if procedure == capture.REAL_FORWARD:
        config = loaded.data_config
        key = ('model',) + tuple(sorted((k, repr(v)) for k, v in config.items()))
        return key, functools.partial(_preprocess_one, config)
    return ('notebook', loaded.img_size), functools.partial(_notebook_one, loaded.img_size)


def _preprocess_one(config: dict, image: Image.Image) -> torch.Tensor:
    return preprocess_batch([image], config)[0]


def _notebook_one(size: int, image: Image.Image) -> torch.Tensor:
    return procedures.notebook_input([image], size)[0]


def run_batch(loaded: LoadedModel, images: List[Image.Image], procedure: str = capture.REAL_FORWARD,
              inputs: Optional[torch.Tensor] = None, **options) -> List[capture.Capture]:
    """Preprocess ``images`` as ``procedure`` does (or take their prepared (B, 3, H, W) ``inputs``, see
    :func:`input_transform`) and capture them in one pass (options of capture.run)."""
    if inputs is not None:
        x = inputs
    elif procedure == capture.REAL_FORWARD:
        x = preprocess_batch(images, loaded.data_config)  # (B, 3, H, W), the model's own transform
    else:
        x = procedures.notebook_input(images, loaded.img_size)  # (B, 3, S, S) in [0, 1]
    return _capture(loaded.model, x, procedure, **options)


def _capture(model: torch.nn.Module, x: torch.Tensor, procedure: str, **options) -> List[capture.Capture]:
    if procedure == capture.REAL_FORWARD:
        return capture.run(model, x, **options)
    options.pop('mlp_hidden', None)
    options.pop('stop_early', None)
    return procedures.run_notebook(model, x, **options)


def capture_points(loaded: LoadedModel, procedure: str = capture.REAL_FORWARD) -> List[capture.Point]:
    """The points ``procedure`` records for this model at its input size, in order (nothing is run)."""
    size = loaded.img_size
    if procedure == capture.REAL_FORWARD:
        points = capture.layer_points(loaded.model, size, size)
        if points is None:
            points = capture.intermediate_points(capture.intermediate_count(loaded.model))
        return points
    return procedures.notebook_points(loaded.model, size, size)


def layer_labels(loaded: LoadedModel, procedure: str = capture.REAL_FORWARD) -> List[str]:
    """The labels of the layers ``procedure`` records for this model at its input size (nothing is run)."""
    return [p.label for p in capture_points(loaded, procedure)]


def memory_estimate(name: str, img_size: int, batch: int = 1, procedure: str = capture.REAL_FORWARD,
                    mlp_hidden: bool = False, dtype: torch.dtype = torch.float32, max_side: Optional[int] = None,
                    keep_maps: bool = True, layers: Optional[Tuple[str, ...]] = None,
                    stop_early: bool = False) -> memory.MemoryEstimate:
    """What :func:`inspect_images` with these options needs for ``batch`` images of ``img_size``.

    The same capture code runs shape-only on a meta-device copy of the model (see :mod:`t2t_viz.memory`);
    results are kept (in memory, and on disk for later processes) keyed by the code that made them.
    """
    key = '|'.join(map(str, (name, img_size, batch, procedure, mlp_hidden, dtype, max_side, keep_maps, layers,
                             stop_early)))
    return _kept_estimate(key, lambda: _trace_estimate(name, img_size, batch, procedure, mlp_hidden, dtype, max_side,
                                                       keep_maps, layers, stop_early))


def display_estimate(name: str, img_size: int, procedure: str = capture.REAL_FORWARD,
                     layers: Optional[Tuple[str, ...]] = None) -> memory.MemoryEstimate:
    """What the app's run of one image needs: display maps kept (``DISPLAY_DTYPE``, at most ``DISPLAY_SIDE``
    pixels a side); ``layers`` limits the capture and stops the pass after the last."""
    return memory_estimate(name, img_size, 1, procedure, dtype=DISPLAY_DTYPE, max_side=DISPLAY_SIDE, layers=layers,
                           stop_early=layers is not None)


def rollout_estimate(name: str, img_size: int, last_block: int) -> memory.MemoryEstimate:
    """What :func:`t2t_viz.attention.attention_rollout` through blocks 0..``last_block`` needs for one image
    (traced like :func:`memory_estimate`, see :func:`t2t_viz.attention.rollout_bytes`)."""
    def trace() -> memory.MemoryEstimate:
        model = zoo.build_on_meta(name, img_size)
        return memory.MemoryEstimate(memory.module_bytes(model),
                                     attention.rollout_bytes(model, img_size, 0, last_block), 0)

    return _kept_estimate(f'rollout|{name}|{img_size}|{last_block}', trace)


def _kept_estimate(key: str, trace: Callable[[], memory.MemoryEstimate]) -> memory.MemoryEstimate:
    with _estimate_lock(key):  # a page and the preloading thread asking at once: traced once
        saved = _saved_estimates().get(key)
        if saved is not None:
            return saved
        estimate = trace()
        _saved_estimates().put(key, estimate)
        return estimate


_estimate_locks: Dict[str, threading.Lock] = {}
_estimate_locks_guard = threading.Lock()


def _estimate_lock(key: str) -> threading.Lock:
    with _estimate_locks_guard:
        return _estimate_locks.setdefault(key, threading.Lock())


def _trace_estimate(name: str, img_size: int, batch: int, procedure: str, mlp_hidden: bool, dtype: torch.dtype,
                    max_side: Optional[int], keep_maps: bool, layers: Optional[Tuple[str, ...]],
                    stop_early: bool) -> memory.MemoryEstimate:
    model = zoo.build_on_meta(name, img_size)
    reduce = memory.ReplayedByShape(layer_stats)  # the statistics of maps of one shape allocate alike

    def run(x: torch.Tensor) -> List[capture.Capture]:
        return _capture(model, x, procedure, mlp_hidden=mlp_hidden, dtype=dtype, max_side=max_side,
                        keep_maps=keep_maps, layers=layers, reduce=reduce, stop_early=stop_early)

    peak, kept = memory.measure_run(run, (batch, 3, img_size, img_size))
    return memory.MemoryEstimate(memory.module_bytes(model), peak, kept)


@lru_cache(maxsize=1)
def _saved_estimates() -> memory.EstimateStore:
    return memory.EstimateStore()


def inspect_images(
        loaded: LoadedModel,
        images: List[Image.Image],
        thresholds: Thresholds = Thresholds(),
        mlp_hidden: bool = False,
        dtype: torch.dtype = torch.float32,
        max_side: Optional[int] = None,
        keep_maps: bool = True,
        layers: Optional[Collection[str]] = None,
        procedure: str = capture.REAL_FORWARD,
        progress: Optional[Callable[[int, int], None]] = None,
        stop_early: bool = False,
        position_floors: Optional[Callable[[str], torch.Tensor]] = None,
        edits: Sequence[capture.Edit] = (),
        inputs: Optional[torch.Tensor] = None,
) -> List[ModelResult]:
    """One pass of the batch through the model; statistics per image and layer, reduced from full maps.

    ``procedure`` is ``'real_forward'`` or ``'paper_notebook'`` (see :mod:`t2t_viz.procedures`);
    ``position_floors(layer name)`` (C,): also locate each channel's maximum where it reaches that floor
    (``LayerStats.max_positions``); ``inputs``: the batch already prepared (see :func:`input_transform`),
    ``images`` then unused. The other options are those of :func:`t2t_viz.capture.run`.
    """
    reduce = StatisticsReduce(thresholds=thresholds) if position_floors is None \
        else _LocatingStats(position_floors, thresholds)
    captures = run_batch(loaded, images, procedure, inputs, mlp_hidden=mlp_hidden, dtype=dtype, max_side=max_side,
                         keep_maps=keep_maps, layers=layers, reduce=reduce, progress=progress,
                         stop_early=stop_early, edits=tuple(edits))
    normalization = _input_normalization(loaded, procedure)
    return [ModelResult(loaded.request, loaded.weights, cap, [summarize(layer, thresholds) for layer in cap.layers],
                        top_k(cap.logits), normalization)
            for cap in captures]


class _LocatingStats:
    """layer_stats for each capture point, locating the channel maxima that reach the point's floor."""

    def __init__(self, floors: Callable[[str], torch.Tensor], thresholds: Thresholds):
        self.floors, self.thresholds = floors, thresholds

    def for_point(self, point: capture.Point) -> StatisticsReduce:
        return StatisticsReduce(position_floor=self.floors(point.module_name), thresholds=self.thresholds)


def _input_normalization(loaded: LoadedModel, procedure: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) the procedure normalized its input with: the model's own, or none for the notebooks'."""
    if procedure == capture.REAL_FORWARD:
        return tuple(loaded.data_config['mean']), tuple(loaded.data_config['std'])
    return (0.0,) * 3, (1.0,) * 3
