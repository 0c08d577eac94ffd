"""The ViT-L/16 weights the T2T-ViT paper visualized, registered again as timm pretrained tags.

The paper's notebook ``visualization_vit.ipynb`` builds timm's ``vit_large_patch16_384`` of early 2021,
whose weights were Google's original ViT-L/16 (ImageNet-21k pretraining, ImageNet-1k fine-tuning at
384x384), converted by timm's author and published as release files. Today's timm lists only the later
AugReg weights for these architectures, so the original files are registered here under timm's own
naming for original weights, ``orig_in21k_ft_in1k``::

    timm.create_model('vit_large_patch16_384.orig_in21k_ft_in1k', pretrained=True)  # the paper's weights
    timm.create_model('vit_large_patch16_224.orig_in21k_ft_in1k', pretrained=True)  # 83.06% top-1 at 224

The files hold a plain state dict in timm's ViT parameter names (qkv bias, no pre-logits layer), so timm's
ViT ``checkpoint_filter_fn`` loads them, resampling the position table for other input sizes.
"""
from __future__ import annotations

from dataclasses import replace

from timm.models import _registry
from timm.models._pretrained import PretrainedCfg

__all__ = ['PAPER_VIT_TAG', 'PAPER_VIT_CFGS', 'register_pretrained_tag']

PAPER_VIT_TAG = 'orig_in21k_ft_in1k'
_RELEASES = 'https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/'
_ORIGINAL = dict(
    num_classes=1000, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation='bicubic', fixed_input_size=True,
    first_conv='patch_embed.proj', classifier='head', license='apache-2.0',
    paper_ids='arXiv:2010.11929', origin_url='https://github.com/google-research/vision_transformer')

PAPER_VIT_CFGS = {
    'vit_large_patch16_384': PretrainedCfg(
        url=_RELEASES + 'jx_vit_large_p16_384-b3be5167.pth', input_size=(3, 384, 384), crop_pct=1.0,
        **_ORIGINAL),
    'vit_large_patch16_224': PretrainedCfg(
        url=_RELEASES + 'jx_vit_large_p16_224-4ee7a4dc.pth', input_size=(3, 224, 224), crop_pct=0.9,
        **_ORIGINAL),
}


def register_pretrained_tag(architecture: str, tag: str, cfg: PretrainedCfg) -> bool:
    """Add ``architecture.tag`` to timm's pretrained registry, as ``register_model`` does for its own tags.

    timm has no public call for adding a tag to an existing architecture, so this writes the same
    registry entries ``timm.models.register_model`` writes. An existing tag is never replaced (a newer
    timm that lists these weights itself wins); returns whether the tag was added.
    """
    name = f'{architecture}.{tag}'
    if architecture not in _registry._model_entrypoints or name in _registry._model_pretrained_cfgs:
        return False
    cfg = replace(cfg, architecture=architecture, tag=tag)
    _registry._model_pretrained_cfgs[name] = cfg
    _registry._model_has_pretrained.add(name)
    _registry._model_with_tags[architecture].append(name)
    default_cfg = _registry._model_default_cfgs.get(architecture)
    if default_cfg is not None:
        default_cfg.tags.append(tag)
        default_cfg.cfgs[tag] = cfg
    return True


for _architecture, _cfg in PAPER_VIT_CFGS.items():
    register_pretrained_tag(_architecture, PAPER_VIT_TAG, _cfg)
