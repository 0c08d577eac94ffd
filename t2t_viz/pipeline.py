"""Image in, everything the app and CLI show out: layers, flags, T2T stages and top-5 classes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Tuple

import torch
from PIL import Image
from timm.data import ImageNetInfo

from . import capture
from .images import preprocess_batch
from .stats import LayerSummary, Thresholds, summarize
from .zoo import LoadedModel, WeightsInfo

__all__ = ['ModelResult', 'inspect_images', 'top_k']


@dataclass
class ModelResult:
    """One model's view of one image."""
    model: str
    weights: WeightsInfo
    capture: capture.Capture
    summaries: List[LayerSummary]
    top5: List[Tuple[str, float]]  # (class description, probability)

    def rows(self, image_name: str) -> List[dict]:
        return [s.row(image_name, self.model, self.weights.label) for s in self.summaries]


@lru_cache(maxsize=1)
def _imagenet() -> ImageNetInfo:
    return ImageNetInfo()


def top_k(logits: torch.Tensor, k: int = 5) -> List[Tuple[str, float]]:
    probs = logits.float().softmax(-1)
    values, indices = probs.topk(min(k, probs.numel()))
    info = _imagenet() if probs.numel() == 1000 else None
    return [(info.index_to_description(i) if info else f'class {i}', float(v))
            for v, i in zip(values.tolist(), indices.tolist())]


def inspect_images(loaded: LoadedModel, images: List[Image.Image], thresholds: Thresholds = Thresholds(),
                   mlp_hidden: bool = False, dtype: torch.dtype = torch.float32) -> List[ModelResult]:
    """One forward pass of the batch through the model; statistics per image and layer."""
    x = preprocess_batch(images, loaded.data_config)  # (B, 3, H, W)
    results = []
    for cap in capture.run(loaded.model, x, mlp_hidden=mlp_hidden, dtype=dtype):
        summaries = [summarize(layer, thresholds) for layer in cap.layers]
        results.append(ModelResult(loaded.name, loaded.weights, cap, summaries, top_k(cap.logits)))
    return results
