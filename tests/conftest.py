import os

import pytest
import torch

import t2t_viz  # noqa: F401  (registers T2T-ViT into timm)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope='session')
def own_cache_dir(tmp_path_factory):
    """Memory estimates and other small files go to a folder of this test run, not the user's cache."""
    os.environ['T2T_VIZ_CACHE_DIR'] = str(tmp_path_factory.mktemp('cache'))


@pytest.fixture(scope='session')
def chelsea():
    from PIL import Image
    from skimage import data
    return Image.fromarray(data.chelsea())
