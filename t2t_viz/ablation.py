"""Channel ablation: does a channel matter? Zero a layer's chosen channels (or set each to its mean over the
image) in one forward pass, and compare that pass with the untouched one: predictions, KL divergence, and
for the layer and every later one, its dead, flat and massive counts and largest |x|.

The change is a forward hook of that one pass (:class:`t2t_viz.capture.Edit`), owned by the call that
registered it and always removed: the shared model is never modified, and two sessions ablating different
channels of the same model at once each get their own result. Channels are changed on the layer's
patch-token grid, where its statistics and dead flags are defined; prefix tokens (a ViT's class token) are
left as they were, so ablating channels that are exactly zero on the grid changes nothing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from PIL import Image

from . import capture
from .capture import REAL_FORWARD, Edit, Point
from .pipeline import ModelResult, capture_points, class_name, inspect_images
from .stats import LayerSummary, Thresholds
from .zoo import LoadedModel

__all__ = ['AblationResult', 'LayerChange', 'ablate', 'choose_channels', 'ablation_rows', 'ABLATION_MODES',
           'ABLATION_COLUMNS', 'CHANNEL_CHOICES']

ABLATION_MODES = ('zero', 'mean')
CHANNEL_CHOICES = ('dead', 'flat', 'massive', 'top:N', 'a list such as 3,17,42')
ABLATION_COLUMNS = ('model', 'weights', 'procedure', 'ablated_layer', 'mode', 'ablated_channels', 'row', 'layer',
                    'depth', 'dead_before', 'dead_after', 'flat_before', 'flat_after', 'massive_before',
                    'massive_after', 'max_abs_before', 'max_abs_after', 'class', 'rank_before', 'rank_after',
                    'probability_before', 'probability_after', 'logit_before', 'logit_after', 'kl_divergence')


def choose_channels(summary: LayerSummary, choice: str) -> List[int]:
    """Channels of one layer by ``choice``: 'dead', 'flat', 'massive' (as flagged in the untouched pass),
    'top:N' (the N largest mean activations, ties to the lower index) or a comma-separated list."""
    choice = choice.strip()
    if choice in ('dead', 'flat', 'massive'):
        return list(getattr(summary, f'{choice}_ids'))
    found = re.fullmatch(r'top:(\d+)', choice)
    if found:
        count = int(found.group(1))
        if not 1 <= count <= summary.channels:
            raise ValueError(f'top:{count}: {summary.label} has {summary.channels} channels')
        means = summary.stats.mean.tolist()
        return sorted(sorted(range(summary.channels), key=lambda c: (-means[c], c))[:count])
    try:
        channels = sorted({int(part) for part in choice.split(',') if part.strip()})
    except ValueError:
        raise ValueError(f'{choice!r}: channels are one of {", ".join(CHANNEL_CHOICES)}') from None
    outside = [c for c in channels if not 0 <= c < summary.channels]
    if not channels or outside:
        raise ValueError(f'{summary.label} has channels 0-{summary.channels - 1}; {outside or choice!r} is not a '
                         'channel list')
    return channels


def _ablating(point: Point, channels: torch.Tensor, mode: str):
    """The change of a module's output that zeroes ``channels`` of its (B, C, H, W) map, or sets each to its
    mean over the map, on a copy; prefix tokens are not on the map and stay as they were."""
    def change(output: torch.Tensor) -> torch.Tensor:
        edited = output.clone()
        fmap = point.to_map(edited)  # (B, C, H, W), a view of the copy
        if fmap.untyped_storage().data_ptr() != edited.untyped_storage().data_ptr():
            raise ValueError(f'{point.label}: its map is not a view of the module output, so it cannot be edited')
        index = channels.to(fmap.device)
        if mode == 'zero':
            fmap[:, index] = 0
        else:
            fmap[:, index] = fmap[:, index].mean(dim=(2, 3), keepdim=True, dtype=torch.float32).to(fmap.dtype)
        return edited
    return change


@dataclass(frozen=True)
class LayerChange:
    """One layer's statistics in the untouched and the ablated pass."""
    layer: str
    label: str
    depth: int
    before: LayerSummary
    after: LayerSummary

    @staticmethod
    def largest(summary: LayerSummary) -> float:
        return abs(summary.top[0].value) if summary.top else 0.0


@dataclass
class AblationResult:
    before: ModelResult
    after: ModelResult
    layer: str  # module path of the ablated layer
    label: str
    channels: List[int]
    mode: str

    @property
    def has_logits(self) -> bool:
        return self.before.capture.logits is not None

    def _probabilities(self, result: ModelResult) -> torch.Tensor:
        return result.capture.logits.double().softmax(-1)

    def kl_divergence(self) -> Optional[float]:
        """KL(before || after) of the predicted class distributions, in nats; None without logits."""
        if not self.has_logits:
            return None
        before = self.before.capture.logits.double().log_softmax(-1)
        after = self.after.capture.logits.double().log_softmax(-1)
        return float((before.exp() * (before - after)).sum())

    def top_class(self) -> Optional[int]:
        """The untouched pass's top-1 class, or None without logits."""
        return int(self.before.capture.logits.argmax()) if self.has_logits else None

    def top_logit_change(self) -> Optional[float]:
        """The ablated minus the untouched logit of the untouched pass's top-1 class."""
        top = self.top_class()
        if top is None:
            return None
        return float(self.after.capture.logits[top]) - float(self.before.capture.logits[top])

    def unchanged(self) -> bool:
        """Whether the ablation changed nothing: every logit (or, without logits, every layer's figures)."""
        if self.has_logits:
            return torch.equal(self.before.capture.logits, self.after.capture.logits)
        return all(change.before.row('', '', '') == change.after.row('', '', '') for change in self.layers())

    def layers(self) -> List[LayerChange]:
        """The ablated layer and every later one, in depth order."""
        start = next(i for i, layer in enumerate(self.before.capture.layers) if layer.name == self.layer)
        return [LayerChange(layer.name, layer.label, layer.depth, before, after)
                for layer, before, after in zip(self.before.capture.layers[start:], self.before.summaries[start:],
                                                self.after.summaries[start:])]

    def predictions(self, k: int = 5) -> List[Dict[str, object]]:
        """The classes in either pass's top k: rank, probability and logit in both passes (before's order first)."""
        if not self.has_logits:
            return []
        before, after = self._probabilities(self.before), self._probabilities(self.after)
        ranks_before, ranks_after = _ranks(before), _ranks(after)
        classes = list(dict.fromkeys(before.topk(k).indices.tolist() + after.topk(k).indices.tolist()))
        return [{'class': class_name(index, before.numel()), 'index': index,
                 'rank_before': ranks_before[index], 'rank_after': ranks_after[index],
                 'probability_before': float(before[index]), 'probability_after': float(after[index]),
                 'logit_before': float(self.before.capture.logits[index]),
                 'logit_after': float(self.after.capture.logits[index])} for index in classes]


def _ranks(probabilities: torch.Tensor) -> Dict[int, int]:
    order = probabilities.argsort(descending=True, stable=True).tolist()
    return {index: rank for rank, index in enumerate(order, start=1)}


def _find_layer(result: ModelResult, wanted: str) -> Tuple[int, capture.Layer]:
    for index, layer in enumerate(result.capture.layers):
        if wanted in (layer.name, layer.label, str(layer.depth)):
            return index, layer
    names = ', '.join(layer.label for layer in result.capture.layers[:6])
    raise ValueError(f'{result.model} has no layer {wanted!r} (labels such as {names}, ..., module paths or depths)')


def ablate(loaded: LoadedModel, image: Image.Image, layer: str, channels: str, mode: str = 'zero',
           procedure: str = REAL_FORWARD, thresholds: Thresholds = Thresholds(),
           before: Optional[ModelResult] = None) -> AblationResult:
    """The untouched pass (or ``before``, a statistics result of the same image) and the pass with ``channels``
    (see :func:`choose_channels`) of ``layer`` (module path, label or depth) ablated by ``mode``."""
    if mode not in ABLATION_MODES:
        raise ValueError(f'mode {mode!r}: one of {", ".join(ABLATION_MODES)}')
    if before is None:
        before = inspect_images(loaded, [image], thresholds, keep_maps=False, procedure=procedure)[0]
    index, found = _find_layer(before, layer)
    chosen = choose_channels(before.summaries[index], channels)
    point = next(p for p in capture_points(loaded, procedure) if p.module_name == found.name)
    edit = Edit(found.name, _ablating(point, torch.tensor(chosen, dtype=torch.long), mode))
    after = inspect_images(loaded, [image], thresholds, keep_maps=False, procedure=procedure,
                           edits=[edit] if chosen else [])[0]
    return AblationResult(before, after, found.name, found.label, chosen, mode)


def _number(value: Optional[float]) -> str:
    return '' if value is None or (isinstance(value, float) and math.isnan(value)) else f'{value:.6g}'


def ablation_rows(result: AblationResult) -> List[Dict[str, object]]:
    """CSV rows (ABLATION_COLUMNS): one per layer from the ablated one on, one per class in either top-5, and a
    'summary' row with the untouched top-1 class's logits and the KL divergence."""
    common = {'model': result.before.model, 'weights': result.before.weights.label,
              'procedure': result.before.procedure, 'ablated_layer': result.layer, 'mode': result.mode,
              'ablated_channels': ';'.join(map(str, result.channels))}
    blank = dict.fromkeys(ABLATION_COLUMNS, '')
    rows = []
    for change in result.layers():
        rows.append({**blank, **common, 'row': 'layer', 'layer': change.layer, 'depth': change.depth,
                     'dead_before': change.before.dead, 'dead_after': change.after.dead,
                     'flat_before': change.before.flat, 'flat_after': change.after.flat,
                     'massive_before': change.before.massive, 'massive_after': change.after.massive,
                     'max_abs_before': _number(LayerChange.largest(change.before)),
                     'max_abs_after': _number(LayerChange.largest(change.after))})
    for prediction in result.predictions():
        rows.append({**blank, **common, 'row': 'prediction', 'class': prediction['class'],
                     'rank_before': prediction['rank_before'], 'rank_after': prediction['rank_after'],
                     **{key: _number(prediction[key]) for key in ('probability_before', 'probability_after',
                                                                  'logit_before', 'logit_after')}})
    if result.has_logits:
        top = result.top_class()
        names = {p['index']: p['class'] for p in result.predictions()}
        rows.append({**blank, **common, 'row': 'summary', 'class': names[top],
                     'logit_before': _number(float(result.before.capture.logits[top])),
                     'logit_after': _number(float(result.after.capture.logits[top])),
                     'kl_divergence': _number(result.kl_divergence())})
    return rows

