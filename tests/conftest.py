import os

import pytest
import torch

import t2t_viz  # noqa: F401  (registers T2T-ViT into timm)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope='session')
def chelsea():
    from PIL import Image
    from skimage import data
    return Image.fromarray(data.chelsea())
