import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import t2t_viz  # noqa: F401  (registers T2T-ViT into timm)

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope='session')
def own_cache_dir(tmp_path_factory):
    """Memory estimates and other small files go to a folder of this test run, not the user's cache."""
    os.environ['T2T_VIZ_CACHE_DIR'] = str(tmp_path_factory.mktemp('cache'))


@pytest.fixture
def empty_cache_dir(tmp_path, monkeypatch):
    """A cache folder of this test alone: no model skeleton or estimate kept by earlier tests."""
    folder = tmp_path / 'cache'
    monkeypatch.setenv('T2T_VIZ_CACHE_DIR', str(folder))
    return folder


@pytest.fixture(params=['fused', 'pytorch'])
def statistics_backend(request, monkeypatch):
    """Runs a test with the fused CPU kernels, then with PyTorch's reductions (what CUDA and meta maps get)."""
    from t2t_viz import kernels
    if request.param == 'fused' and not kernels.fused_available():
        pytest.skip('numba is not installed')
    monkeypatch.setenv('T2T_VIZ_FUSED', '1' if request.param == 'fused' else '0')  # for processes it starts
    monkeypatch.setattr(kernels, '_SWITCHED_OFF', request.param != 'fused')  # this one read it at import
    return request.param


@pytest.fixture(scope='session')
def chelsea():
    from PIL import Image
    from skimage import data
    return Image.fromarray(data.chelsea())


def _cloned_outputs(model: torch.nn.Module, x: torch.Tensor, names) -> dict:
    """Reference outputs: each named module's output cloned the moment it is produced, in one pass of ``x``;
    the keys are in the order the modules returned."""
    outputs, modules = {}, dict(model.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach().clone()))
        for name in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


@pytest.fixture(scope='session')
def cloned_outputs():
    return _cloned_outputs


class _AtenOps(TorchDispatchMode):
    """Records the name of every aten operation that reaches the kernels beneath it (e.g. 'uniform_')."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope='session')
def aten_ops():
    return _AtenOps
