"""Models and where their weights come from.

Resolution order for every model, reported as a :class:`WeightsInfo`:
    1. an explicit checkpoint, or a file in the checkpoint folder with a documented name;
    2. timm's download cache (Hugging Face hub or release URL), or, when online and allowed, a download
       into the checkpoint folder (:mod:`t2t_viz.downloads`, with progress);
    3. random initialisation, marked ``random`` wherever it shows. Never presented as trained.

A model whose weights come from a file is built on the meta device and the file's tensors are assigned
to it (mapped from zip-format files, not copied), so no time goes into a random initialisation that the
weights would overwrite; the modules themselves are built once and then unpickled (:mod:`skeletons`).
Before anything is built, the model's size is counted on the meta device and a model that would not fit
is refused.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from torch.nn.modules.batchnorm import _NormBase
from torch.overrides import TorchFunctionMode

from . import downloads, memory, skeletons
from .images import ImageError
from .models import CheckpointError, read_checkpoint

__all__ = [
    'DEFAULT_MODELS', 'PRESETS', 'DEFAULT_PRESET', 'PRETRAINED_TAGS', 'WeightsInfo', 'LoadedModel',
    'WeightsError', 'load', 'resolve_device', 'weights_status', 'checkpoint_candidates', 'checkpoint_folder',
    'download', 'remote_weights', 'build_on_meta', 'check_input_size', 'check_name', 'split_name', 'data_config',
]

_logger = logging.getLogger(__name__)

# The trio of the paper's Figure 2, with the weights the paper used (see t2t_viz.models.paper_weights),
# and the same trio with today's timm default weights.
PRESETS: Dict[str, Tuple[str, ...]] = {
    'paper': ('resnet50.tv_in1k', 'vit_large_patch16_384.orig_in21k_ft_in1k', 't2t_vit_24.in1k'),
    'timm': ('resnet50.tv_in1k', 'vit_large_patch16_224.augreg_in21k_ft_in1k', 't2t_vit_24.in1k'),
}
DEFAULT_PRESET = 'paper'
DEFAULT_MODELS = PRESETS[DEFAULT_PRESET]
# Which trained weights a bare architecture name means.
PRETRAINED_TAGS = {
    'resnet50': 'tv_in1k',  # the classic torchvision ImageNet weights
    'vit_large_patch16_224': 'augreg_in21k_ft_in1k',
    'vit_large_patch16_384': 'orig_in21k_ft_in1k',  # the paper's
    't2t_vit_24': 'in1k',  # official 82.3% release
}
CHECKPOINT_EXTENSIONS = ('.safetensors', '.pth', '.pth.tar', '.bin', '.npz')
_SOURCE_CHECKPOINTS = Path(__file__).resolve().parent.parent / 'checkpoints'


def checkpoint_folder() -> Path:
    """Where weight files are looked for and downloaded to.

    ``T2T_VIZ_CHECKPOINTS`` if set; else the repository's ``checkpoints/`` when running from a source
    checkout; else ``~/.cache/t2t_viz/checkpoints`` (an installed package).
    """
    configured = os.environ.get('T2T_VIZ_CHECKPOINTS')
    if configured:
        return Path(configured).expanduser()
    if (_SOURCE_CHECKPOINTS / 'README.md').is_file():
        return _SOURCE_CHECKPOINTS
    return Path.home() / '.cache' / 't2t_viz' / 'checkpoints'


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
    request: str = ''  # the name as asked for, pretrained tag included when one was given

    def __post_init__(self) -> None:
        self.request = self.request or self.name


def resolve_device(device: str = 'auto') -> torch.device:
    if device == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise WeightsError('device cuda was asked for but no CUDA GPU is available')
    if device not in ('cpu', 'cuda'):
        raise WeightsError(f"device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)


def split_name(name: str) -> Tuple[str, str]:
    """('arch', 'tag') of a timm name; a bare architecture gets the tag of the weights we mean by it."""
    arch, _, tag = name.partition('.')
    return arch, tag or PRETRAINED_TAGS.get(arch, '')


def _pretrained_cfg(name: str):
    arch, tag = split_name(name)
    try:
        return timm.models.get_pretrained_cfg(f'{arch}.{tag}' if tag else arch)
    except (RuntimeError, KeyError):
        return None


def remote_weights(name: str) -> Optional[downloads.RemoteFile]:
    """The file that holds the trained weights of ``name`` online, or None."""
    cfg = _pretrained_cfg(name)
    arch, tag = split_name(name)
    return downloads.remote_file(cfg, f'{arch}.{tag}' if tag else arch) if cfg else None


def checkpoint_candidates(name: str, directory: Optional[Path] = None) -> list:
    """File names looked for in the checkpoint folder for a model, in order."""
    directory = checkpoint_folder() if directory is None else directory
    arch, tag = split_name(name)
    names = [f'{arch}{ext}' for ext in CHECKPOINT_EXTENSIONS]
    if tag:
        names = [f'{arch}.{tag}{ext}' for ext in CHECKPOINT_EXTENSIONS] + names
    remote = remote_weights(name)
    if remote:
        names.append(remote.filename)  # e.g. 82.3_T2T_ViT_24.pth.tar, jx_vit_large_p16_384-b3be5167.pth
    cfg = _pretrained_cfg(name)
    if cfg and cfg.url:
        names.append(os.path.basename(urlparse(cfg.url).path))
    return [directory / n for n in dict.fromkeys(names)]


def _cached_file(cfg) -> Optional[str]:
    """A copy of the pretrained weights that timm itself downloaded earlier, found without the network."""
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


def _create(arch: str, tag: str, pretrained: bool, img_size: Optional[int], **kwargs) -> nn.Module:
    if img_size is not None:
        kwargs['img_size'] = img_size
    return timm.create_model(f'{arch}.{tag}' if tag else arch, pretrained=pretrained, **kwargs)


def _supports_img_size(arch: str) -> bool:
    return arch.startswith(('vit_', 't2t_vit', 'deit', 'eva', 'beit'))


_build_lock = threading.Lock()  # timm's registry and layer config are process-wide while a model is built
_SHAPE_CHANGING_IN_PLACE = {'resize_', 'resize_as_', 'set_', 'as_strided_', 'squeeze_', 'unsqueeze_', 't_',
                            'transpose_', 'swapdims_', 'swapaxes_'}


class _NoDataWrites(TorchFunctionMode):
    """Skips in-place writes into meta tensors (initialisation, filled tables): they hold no data, and on the
    meta device they run through slow Python reference kernels (0.5 s for T2T-ViT-24's truncated normals)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        target = args[0] if args else kwargs.get('tensor')  # torch.nn.init passes its tensor by keyword
        writes = name == '__setitem__' or (name.endswith('_') and not name.startswith('__'))
        if writes and name not in _SHAPE_CHANGING_IN_PLACE and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


@contextmanager
def _on_meta():
    """Build models on the meta device, without initialising what has no data."""
    with _build_lock, torch.device('meta'), _NoDataWrites():
        yield


def check_name(name: str) -> None:
    """Raise WeightsError for a name that is neither a timm model nor a T2T-ViT variant."""
    if not timm.is_model(split_name(name)[0]):
        raise WeightsError(f'unknown model {name!r} (not in timm and not a T2T-ViT variant)')


def _build_on_meta(arch: str, tag: str, img_size: Optional[int]) -> nn.Module:
    with _on_meta():
        return _create(arch, tag, False, img_size).eval()


def build_on_meta(name: str, img_size: Optional[int] = None) -> nn.Module:
    """The model's modules with shapes but no data (no memory, no initialisation), in eval mode.

    A new model at every call; built once per code version and then unpickled (see :mod:`skeletons`).
    """
    check_name(name)
    arch, tag = split_name(name)
    size = img_size if img_size and _supports_img_size(arch) else None
    return skeletons.load_or_build(f'{name}|{size}', functools.partial(_build_on_meta, arch, tag, size))


def _module_filter(model: nn.Module) -> Optional[Callable]:
    """The checkpoint filter of the model's timm module (timm's convention: ``checkpoint_filter_fn``)."""
    return getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)


def _plain_state_dict(checkpoint: dict) -> dict:
    for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return {k[len('module.'):] if k.startswith('module.') else k: v
            for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


_PLAIN_LOADERS = (nn.Module._load_from_state_dict, _NormBase._load_from_state_dict)


def _loads_plainly(module: nn.Module) -> bool:
    """Whether ``load_state_dict`` would do no more for this module than assign its own tensors."""
    kind = type(module)
    return (kind._load_from_state_dict in _PLAIN_LOADERS and kind.set_extra_state is nn.Module.set_extra_state
            and not module._load_state_dict_pre_hooks and not module._load_state_dict_post_hooks)


def _assign(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state_dict, strict=True, assign=True)``, with floating-point tensors cast to the
    model's dtypes; refuses a file that leaves a tensor unset.

    Done here for models whose modules only hold tensors: torch matches every module's prefix against
    every key, which was a quarter of ResNet50's load. Models with load hooks or extra state go through torch.
    """
    modules = dict(model.named_modules(remove_duplicate=False))  # a shared module is loaded under each name
    if torch.__future__.get_swap_module_params_on_conversion() or not all(map(_loads_plainly, modules.values())):
        unset = _assign_by_torch(model, state_dict)
    else:
        unset = _assign_plainly(modules, state_dict)
    if unset:
        raise _NotAssignable(f'{len(unset)} tensors are not in the file, e.g. {unset[0]}')


def _assign_by_torch(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> List[str]:
    expected = dict(_named_tensors(model))
    model.load_state_dict({k: v.to(expected[k].dtype) if k in expected and v.is_floating_point() else v
                           for k, v in state_dict.items()}, strict=True, assign=True)
    return [n for n, t in _named_tensors(model) if t.is_meta]


def _assign_plainly(modules: Dict[str, nn.Module], state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """Assign each module's parameters and persistent buffers; returns the non-persistent buffers left unset.

    A state dict's version metadata is not read: a BatchNorm without its batch counter gets 0, as torch
    gives files from before the counter existed.
    """
    remaining = dict(state_dict)
    missing, wrong_shape, unset = [], [], []
    for module_name, module in modules.items():
        prefix = f'{module_name}.' if module_name else ''
        counter = f'{prefix}num_batches_tracked'
        if isinstance(module, _NormBase) and module.track_running_stats and counter not in remaining:
            remaining[counter] = torch.tensor(0, dtype=torch.long)
        for name, current in (*module._parameters.items(), *module._buffers.items()):
            if current is None:
                continue
            key = prefix + name
            if name in module._non_persistent_buffers_set:  # not in files: set by the module itself
                if current.is_meta:
                    unset.append(key)
                continue
            value = remaining.pop(key, None)
            if value is None:
                missing.append(key)
            elif value.shape != current.shape:
                wrong_shape.append(f'{key} is {tuple(value.shape)} in the file, {tuple(current.shape)} in the model')
            else:
                if value.dtype != current.dtype and value.is_floating_point():
                    value = value.to(current.dtype)
                if isinstance(current, nn.Parameter):
                    module._parameters[name] = nn.Parameter(value, requires_grad=current.requires_grad)
                else:
                    module._buffers[name] = value
    problems = [f'{len(missing)} tensors missing (e.g. {missing[0]})'] if missing else []
    problems += [f'{len(remaining)} not in the model (e.g. {next(iter(remaining))})'] if remaining else []
    problems += [f'{len(wrong_shape)} of another shape (e.g. {wrong_shape[0]})'] if wrong_shape else []
    if problems:
        raise ValueError('; '.join(problems))
    return unset


def _assign_file(model: nn.Module, path: str) -> nn.Module:
    """Load ``path`` into a meta-device ``model`` by assignment (see :func:`_assign`)."""
    checkpoint = read_checkpoint(path, mmap=True)  # assigned as they are: no copy into the heap
    filter_fn = _module_filter(model)
    _assign(model, filter_fn(checkpoint, model) if filter_fn else _plain_state_dict(checkpoint))
    return model


def _named_tensors(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


class _NotAssignable(Exception):
    """The meta-device load cannot give this model all its tensors; it is built the ordinary way."""


def _create_from_file(arch: str, tag: str, img_size: Optional[int], path: str, meta_model: nn.Module) -> nn.Module:
    """Build, in eval mode, with the weights of a local file (checkpoint folder, --checkpoint or timm's cache).

    Errors name the file.

    ``meta_model`` is the same model built on the meta device; it is consumed.
    """
    try:
        if not path.endswith('.npz'):
            try:
                return _assign_file(meta_model, path)
            except _NotAssignable as e:
                _logger.info('%s: building %s the ordinary way (%s)', path, arch, e)
        overlay = dict(file=path)
        if path.endswith('.npz') and arch.startswith('vit_'):
            overlay['custom_load'] = True  # original big_vision / jax .npz: timm's own reader
        return _create(arch, tag, True, img_size, pretrained_cfg_overlay=overlay).eval()
    except CheckpointError as e:
        raise WeightsError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - torch, timm and safetensors raise many kinds for a bad file
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise WeightsError(f'{path}: not usable weights for {arch} ({first_line})') from e


def check_input_size(img_size: int) -> None:
    """Refuse an input size that is not a multiple of 16 (at least 32)."""
    if img_size < 32 or img_size % 16:
        raise ImageError(f'input size {img_size} must be a multiple of 16 (at least 32)')


def load(
        name: str,
        checkpoint: Optional[str] = None,
        img_size: Optional[int] = None,
        device: str = 'auto',
        allow_download: bool = True,
        checkpoint_dir: Optional[Path] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
        max_weight_bytes: Optional[int] = None,
) -> LoadedModel:
    """Build ``name`` in eval mode on ``device`` with the best weights available (see module doc).

    Raises WeightsError for unusable weights, ImageError for an input size that is not a multiple of 16,
    and InsufficientMemory for a model whose weights would not fit in the available memory (or in
    ``max_weight_bytes``), before anything is built.
    """
    check_name(name)
    arch, tag = split_name(name)
    if img_size:
        check_input_size(img_size)
    torch_device = resolve_device(device)
    size = img_size if img_size and _supports_img_size(arch) else None
    meta_model = build_on_meta(name, size)
    needed = memory.module_bytes(meta_model)
    if max_weight_bytes is not None and needed > max_weight_bytes:
        raise memory.InsufficientMemory(
            f'{name}: its weights take {memory.format_bytes(needed)}, over the {memory.format_bytes(max_weight_bytes)} '
            'this server allows for one model')
    memory.check_fits(needed, f'{name} (weights)')  # every path builds on the CPU first
    if torch_device.type != 'cpu':
        memory.check_fits(needed, f'{name} (weights)', device=torch_device)

    if checkpoint:
        if not Path(checkpoint).is_file():
            raise WeightsError(f'{checkpoint}: no such checkpoint file')
        weights = WeightsInfo('file', True, checkpoint)
    else:
        weights = weights_status(name, checkpoint_dir)
    remote = remote_weights(name)
    if not weights.trained and allow_download and remote and not downloads.offline_reason(remote.url):
        directory = checkpoint_folder() if checkpoint_dir is None else checkpoint_dir
        try:
            path = downloads.download(remote, directory, progress)
        except downloads.DownloadError as e:
            raise WeightsError(f'{name}: {e}') from e
        weights = WeightsInfo('download', True, str(path))
    if weights.trained:
        model = _create_from_file(arch, tag, size, weights.location, meta_model)
    else:
        with _build_lock:
            model = _create(arch, tag, False, size).eval()
        _logger.info('%s: %s', name, weights.describe())
    if torch_device.type != 'cpu':  # every path builds on the CPU
        model = model.to(torch_device)
    config = _data_config(model, img_size)
    return LoadedModel(arch, model, weights, config, torch_device, img_size or config['input_size'][-1], request=name)


def _data_config(model: nn.Module, img_size: Optional[int]) -> dict:
    config = resolve_data_config(model=model)
    if img_size:
        config['input_size'] = (3, img_size, img_size)
    return config


def data_config(name: str, img_size: Optional[int] = None) -> dict:
    """The resize, crop, mean and std :func:`load` would give ``name`` at ``img_size``, without loading it."""
    arch, _ = split_name(name)
    return _data_config(build_on_meta(name, img_size if img_size and _supports_img_size(arch) else None), img_size)


def weights_status(name: str, directory: Optional[Path] = None) -> WeightsInfo:
    """Where the weights of ``name`` would come from now, without building the model or using the network."""
    found = [p for p in checkpoint_candidates(name, directory) if p.is_file()]
    if found:
        return WeightsInfo('file', True, str(found[0]))
    cfg = _pretrained_cfg(name)
    cached = _cached_file(cfg)
    if cached:
        return WeightsInfo('cache', True, cached)
    remote = remote_weights(name)
    if remote is None:
        return WeightsInfo('random', False, note='no pretrained weights are known for this model')
    folder = checkpoint_folder() if directory is None else directory
    return WeightsInfo('random', False, remote.url, note=(
        f'not downloaded yet: put {remote.filename} in {folder} (see checkpoints/README.md) or run '
        f'`t2t-viz weights --download --model {name}` ({remote.url})'))


def download(name: str, progress: Optional[Callable[[int, Optional[int]], None]] = None,
             directory: Optional[Path] = None) -> WeightsInfo:
    """Fetch the pretrained weights of ``name`` into the checkpoint folder (needs the network)."""
    remote = remote_weights(name)
    if remote is None:
        raise WeightsError(f'{name}: no pretrained weights are known for this model')
    reason = downloads.offline_reason(remote.url)
    if reason:
        raise WeightsError(f'{name}: cannot download {remote.url}: {reason}')
    try:
        downloads.download(remote, checkpoint_folder() if directory is None else directory, progress)
    except downloads.DownloadError as e:
        raise WeightsError(f'{name}: {e}') from e
    return weights_status(name, directory)


def load_many(names: Sequence[str], checkpoints: Optional[Dict[str, str]] = None, **kwargs) -> Dict[str, LoadedModel]:
    checkpoints = checkpoints or {}
    return {name: load(name, checkpoint=checkpoints.get(name), **kwargs) for name in names}
