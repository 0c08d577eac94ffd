"""t2t-viz: look inside ResNet, ViT and T2T-ViT feature maps.

Importing the package registers the T2T-ViT family into timm, so ``timm.create_model('t2t_vit_24')``
works like any timm model.
"""
from . import models

__version__ = '0.1.0'
