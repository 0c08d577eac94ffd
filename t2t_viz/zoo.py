"""Models and where their weights come from.

Resolution order for every model, reported as a :class:`WeightsInfo`:
    1. an explicit checkpoint, or a file in ``checkpoints/`` with a documented name;
    2. timm's download cache (Hugging Face hub or release URL), or, when online, timm's download itself;
    3. random initialisation, marked ``random`` wherever it shows. Never presented as trained.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import urlparse

import timm
import torch
from timm.data import resolve_data_config

from .images import check_input_size
from .models import CheckpointError

__all__ = [
    'DEFAULT_MODELS', 'PRETRAINED_TAGS', 'CHECKPOINT_DIR', 'WeightsInfo', 'LoadedModel', 'WeightsError',
    'load', 'resolve_device', 'weights_status', 'checkpoint_candidates',
]

_logger = logging.getLogger(__name__)

DEFAULT_MODELS = ('resnet50', 'vit_large_patch16_224', 't2t_vit_24')
# Which trained weights each default model means.
PRETRAINED_TAGS = {
    'resnet50': 'tv_in1k',  # the classic torchvision ImageNet weights
    'vit_large_patch16_224': 'augreg_in21k_ft_in1k',
    't2t_vit_24': 'in1k',  # official 82.3% release
}
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / 'checkpoints'
CHECKPOINT_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin', '.npz')
ONLINE_PROBE_TIMEOUT_S = 3.0


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message names the file or source and the reason."""


@dataclass(frozen=True)
class WeightsInfo:
    source: str  # 'file' | 'cache' | 'download' | 'random'
    trained: bool
    location: str = ''  # file path or URL / hub id
    note: str = ''  # why random, or how to get trained weights

    @property
    def label(self) -> str:
        """Short tag for CSV and banners: 'trained' or 'random'."""
        return 'trained' if self.trained else 'random'

    def describe(self) -> str:
        if self.trained:
            return f'trained ({self.source}: {self.location})'
        return f'random weights: {self.note}'


@dataclass
class LoadedModel:
    name: str  # architecture name as timm knows it
    model: torch.nn.Module
    weights: WeightsInfo
    data_config: Dict = field(default_factory=dict)  # mean/std/interpolation/crop/input_size for preprocessing
    device: torch.device = torch.device('cpu')
    img_size: int = 224


def resolve_device(device: str = 'auto') -> torch.device:
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise WeightsError('device cuda was asked for but no CUDA GPU is available')
    if device not in ('cpu', 'cuda'):
        raise WeightsError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def _split_name(name: str) -> Tuple[str, str]:
    arch, _, tag = name.partition('.')
    return arch, tag or PRETRAINED_TAGS.get(arch, '')


def checkpoint_candidates(name: str, directory: Path = CHECKPOINT_DIR) -> list:
    """File names looked for in ``checkpoints/`` for a model, in order."""
    arch, tag = _split_name(name)
    names = [f'{arch}{ext}' for ext in CHECKPOINT_EXTENSIONS]
    if tag:
        names = [f'{arch}.{tag}{ext}' for ext in CHECKPOINT_EXTENSIONS] + names
    cfg = _pretrained_cfg(name)
    for remote in (cfg.url if cfg else None, cfg.hf_hub_filename if cfg else None):
        if remote:
            names.append(os.path.basename(urlparse(remote).path))  # e.g. 82.3_T2T_ViT_24.pth.tar
    return [directory / n for n in dict.fromkeys(names)]


def _pretrained_cfg(name: str):
    arch, tag = _split_name(name)
    try:
        return timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    except (RuntimeError, KeyError):
        return None


def _cached_file(cfg) -> Optional[str]:
    """A previously downloaded copy of the pretrained weights, found without touching the network."""
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for filename in (cfg.hf_hub_filename, 'open_clip_model.safetensors', 'model.safetensors',
                         'pytorch_model.bin'):
            if filename:
                hit = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(hit, str):
                    return hit
    if cfg.url:
        path = Path(torch.hub.get_dir()) / 'checkpoints' / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return str(path)
    return None


def _is_online(cfg) -> bool:
    """Quick TCP probe of the weights' host, so an offline machine falls through in seconds."""
    if os.environ.get('HF_HUB_OFFLINE') == '1' or os.environ.get('T2T_VIZ_OFFLINE') == '1' or cfg is None:
        return False
    host = 'huggingface.co' if cfg.hf_hub_id else urlparse(cfg.url or '').hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=ONLINE_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _file_overlay(arch: str, path: str) -> dict:
    overlay = dict(file=path)
    if arch.startswith('vit_') and path.endswith('.npz'):
        overlay['custom_load'] = True  # original big_vision / jax .npz: timm's own reader
    return overlay


def _create(arch: str, tag: str, pretrained: bool, img_size: Optional[int], **kwargs) -> torch.nn.Module:
    if img_size is not None:
        kwargs['img_size'] = img_size
    return timm.create_model(f'{arch}.{tag}' if tag else arch, pretrained=pretrained, **kwargs)


def _create_from_file(arch: str, tag: str, img_size: Optional[int], path: str) -> torch.nn.Module:
    """Build with the weights of a local file (checkpoints/, --checkpoint or timm's cache); errors name it."""
    try:
        return _create(arch, tag, True, img_size, pretrained_cfg_overlay=_file_overlay(arch, path))
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - torch, timm and safetensors raise many kinds for a bad file
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsError(f'{path}: not usable weights for {arch} ({first_line})') from e


def _supports_img_size(arch: str) -> bool:
    return arch.startswith(('vit_', 't2t_vit', 'deit', 'eva', 'beit'))


def load(
        name: str,
        checkpoint: Optional[str] = None,
        img_size: Optional[int] = None,
        device: str = 'auto',
        allow_download: bool = True,
        checkpoint_dir: Path = CHECKPOINT_DIR,
) -> LoadedModel:
    """Build ``name`` in eval mode on ``device`` with the best weights available (see module doc).

    Raises WeightsError for unusable weights and ImageError for an input size that is not a multiple of 16
    or would not fit in memory.
    """
    arch, tag = _split_name(name)
    if not timm.is_model(arch):
        raise WeightsError(f'unknown model {name!r} (not in timm and not a T2T-ViT variant)')
    if img_size:
        check_input_size(img_size, arch)
    torch_device = resolve_device(device)
    size = img_size if img_size and _supports_img_size(arch) else None
    cfg = _pretrained_cfg(name)

    if checkpoint:
        if not Path(checkpoint).is_file():
            raise WeightsError(f'{checkpoint}: no such checkpoint file')
        weights = WeightsInfo('file', True, checkpoint)
    else:
        weights = weights_status(name, checkpoint_dir)
    if weights.trained:
        model = _create_from_file(arch, tag, size, weights.location)
    elif allow_download and _is_online(cfg):
        timm.models.set_pretrained_download_progress(True)
        model = _create(arch, tag, True, size)
        weights = WeightsInfo('download', True, cfg.hf_hub_id or cfg.url)
    else:
        model = _create(arch, tag, False, size)
        reason = 'no checkpoint file, no cached download, and the machine is offline' if cfg else \
            'no pretrained weights are known for this model'
        weights = WeightsInfo('random', False, note=(
            f'{reason}; put the file in checkpoints/ (see checkpoints/README.md) or run '
            '`python -m t2t_viz weights --download`'))
        _logger.info('%s: %s', name, weights.describe())
    model = model.eval().to(torch_device)
    data_config = resolve_data_config(model=model)
    if img_size:
        data_config['input_size'] = (3, img_size, img_size)
    return LoadedModel(arch, model, weights, data_config, torch_device, img_size or data_config['input_size'][-1])


def weights_status(name: str, checkpoint_dir: Path = CHECKPOINT_DIR) -> WeightsInfo:
    """Where the weights of ``name`` would come from now, without building the model."""
    found = [p for p in checkpoint_candidates(name, checkpoint_dir) if p.is_file()]
    if found:
        return WeightsInfo('file', True, str(found[0]))
    cfg = _pretrained_cfg(name)
    cached = _cached_file(cfg)
    if cached:
        return WeightsInfo('cache', True, cached)
    if cfg is None:
        return WeightsInfo('random', False, note='no pretrained weights are known for this model')
    remote = cfg.hf_hub_id or cfg.url
    return WeightsInfo('random', False, remote, note=f'not downloaded yet ({remote})')


def download(name: str) -> WeightsInfo:
    """Fetch the pretrained weights of ``name`` into timm's caches (needs the network)."""
    cfg = _pretrained_cfg(name)
    if cfg is None:
        raise WeightsError(f'{name}: no pretrained weights are known for this model')
    if not _is_online(cfg):
        raise WeightsError(f'{name}: cannot reach {cfg.hf_hub_id or cfg.url}: the machine is offline')
    arch, tag = _split_name(name)
    timm.models.set_pretrained_download_progress(True)
    _create(arch, tag, True, None)
    return weights_status(name)


def load_many(names: Sequence[str], checkpoints: Optional[Dict[str, str]] = None, **kwargs) -> Dict[str, LoadedModel]:
    checkpoints = checkpoints or {}
    return {name: load(name, checkpoint=checkpoints.get(name), **kwargs) for name in names}
