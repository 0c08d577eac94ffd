"""Views of a layer as a whole: principal-component colour maps of its tokens.

A layer's (C, H, W) map is H*W tokens of C features. Their first three principal components, each scaled
to [0, 1], drawn as red, green and blue on the token grid, show at a glance which tokens the layer treats
alike (the picture DINO made familiar: object parts in one colour). Class and register tokens are never
part of the maps, so they never take part in the components.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ['PrincipalComponents', 'principal_components', 'pca_rgb']


@dataclass
class PrincipalComponents:
    directions: torch.Tensor  # (k, C) unit vectors, strongest first
    projections: torch.Tensor  # (k, H, W) each token's coordinate along each direction
    explained: torch.Tensor  # (k,) fraction of the total variance along each direction


def principal_components(fmap: torch.Tensor, k: int = 3) -> PrincipalComponents:
    """The ``k`` strongest principal directions of the tokens of a (C, H, W) map (channels as features).

    Computed exactly from the C x C covariance. A direction's sign is chosen so that the token farthest
    along it lies on the positive side, which makes the colours of a map reproducible.
    """
    C, H, W = fmap.shape
    tokens = fmap.reshape(C, H * W).t().double()  # (N, C)
    centered = tokens - tokens.mean(dim=0, keepdim=True)  # (N, C)
    covariance = centered.t() @ centered / max(1, H * W - 1)  # (C, C)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    k = min(k, C)
    directions = eigenvectors[:, -k:].flip(-1).t()  # (k, C), strongest first
    projections = centered @ directions.t()  # (N, k)
    farthest = projections.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(projections[farthest, torch.arange(k)])
    signs[signs == 0] = 1
    directions, projections = directions * signs[:, None], projections * signs
    total = eigenvalues.clamp(min=0).sum()
    explained = eigenvalues.flip(-1)[:k].clamp(min=0) / total if total > 0 else torch.zeros(k, dtype=torch.float64)
    return PrincipalComponents(directions.float(), projections.t().reshape(k, H, W).float(), explained.float())


def pca_rgb(fmap: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float in [0, 1]: the first three principal components as red, green, blue.

    Each component is scaled by its own min and max over the tokens; a map with fewer than three
    channels, or a constant component, leaves that colour at 0.
    """
    components = principal_components(fmap, 3).projections  # (k, H, W)
    rgb = torch.zeros(3, *fmap.shape[1:])
    for i, component in enumerate(components):
        low, high = component.min(), component.max()
        if high > low:
            rgb[i] = (component - low) / (high - low)
    return rgb.permute(1, 2, 0).numpy()
