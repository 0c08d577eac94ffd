"""Model skeletons on disk: built once per code version, then unpickled; read only when nobody else can write."""
import logging
import os
import pickle
import time

import pytest
import timm
import torch
import torch.nn as nn

from t2t_viz import skeletons, zoo

pytestmark = pytest.mark.skipif(not hasattr(os, 'getuid'), reason='skeletons are kept only where files have owners')


@pytest.fixture
def builds(monkeypatch, empty_cache_dir):
    """The architectures really built on the meta device (not unpickled), in order."""
    built = []
    original = zoo._build_on_meta

    def counting(arch, tag, img_size):
        built.append(arch)
        return original(arch, tag, img_size)

    monkeypatch.setattr(zoo, '_build_on_meta', counting)
    return built


def _layout(model: nn.Module) -> dict:
    return {k: (v.shape, v.dtype, v.device.type) for k, v in model.state_dict().items()}


@pytest.mark.parametrize('name', ['resnet18', 't2t_vit_7'])
def test_a_model_is_built_once_then_unpickled_and_loads_the_same(name, builds, tmp_path):
    first = zoo.build_on_meta(name)
    second = zoo.build_on_meta(name)
    assert builds == [name]
    assert second is not first and type(second) is type(first) and not second.training
    assert _layout(second) == _layout(first) and {d for _, _, d in _layout(second).values()} == {'meta'}
    assert second.pretrained_cfg == first.pretrained_cfg

    torch.manual_seed(3)
    source = timm.create_model(name).eval()
    torch.save(source.state_dict(), tmp_path / f'{name}.pth')
    loaded = zoo.load(name, device='cpu', checkpoint_dir=tmp_path)
    assert builds == [name]  # the load unpickled it too
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), source(x), rtol=0, atol=0)


def test_each_input_size_code_version_and_timm_setting_has_its_own_skeleton(builds, monkeypatch):
    zoo.build_on_meta('vit_tiny_patch16_224')
    assert zoo.build_on_meta('vit_tiny_patch16_224', 320).pos_embed.shape == (1, 401, 192)
    assert builds == ['vit_tiny_patch16_224'] * 2
    monkeypatch.setattr(timm.layers.config, '_USE_FUSED_ATTN', 0)  # read by the attention layers when built
    assert not zoo.build_on_meta('vit_tiny_patch16_224').blocks[0].attn.fused_attn
    monkeypatch.setattr(skeletons, 'code_version', lambda: 'other code')
    zoo.build_on_meta('vit_tiny_patch16_224')
    assert len(builds) == 4


def test_only_a_skeleton_that_nobody_else_can_write_is_read(builds, caplog):
    zoo.build_on_meta('resnet18')
    (path,) = skeletons.folder().glob('*.pkl')
    path.chmod(0o666)
    with caplog.at_level(logging.WARNING, logger='t2t_viz.cachefiles'):
        zoo.build_on_meta('resnet18')
    assert len(builds) == 2 and 'another user owns it or can write it' in caplog.text
    assert path.stat().st_mode & 0o777 == 0o600  # written again, for this user alone
    skeletons.folder().chmod(0o777)
    try:
        path.unlink()
        zoo.build_on_meta('resnet18')
        assert not list(skeletons.folder().iterdir())  # nothing written into a folder others can write
    finally:
        skeletons.folder().chmod(0o700)
    assert len(builds) == 3 and 'nothing is read from or written to this folder' in caplog.text
    zoo.build_on_meta('resnet18')
    zoo.build_on_meta('resnet18')
    assert len(builds) == 4  # kept again once the folder is this user's alone


@pytest.mark.parametrize('content', [b'not a pickle', pickle.dumps({'not': 'a module'})])
def test_a_damaged_skeleton_is_built_again_and_replaced(builds, content):
    zoo.build_on_meta('resnet18')
    (path,) = skeletons.folder().glob('*.pkl')
    path.write_bytes(content)
    assert isinstance(zoo.build_on_meta('resnet18'), nn.Module) and len(builds) == 2
    zoo.build_on_meta('resnet18')
    assert len(builds) == 2


def test_the_folder_is_kept_under_its_size_least_recently_used_out(builds, monkeypatch):
    names = ['resnet18', 't2t_vit_7', 'vit_tiny_patch16_224']
    paths = {name: skeletons.folder() / skeletons._file_name(f'{name}|None') for name in names}
    for name in names:
        zoo.build_on_meta(name)
    monkeypatch.setattr(skeletons, 'MAX_BYTES', sum(p.stat().st_size for p in paths.values()) - 1)
    paths['vit_tiny_patch16_224'].unlink()
    for age, name in enumerate(names[:2]):
        os.utime(paths[name], (time.time() - 100 + age,) * 2)  # resnet18 the older
    zoo.build_on_meta('resnet18')  # read: now the more recently used
    zoo.build_on_meta('vit_tiny_patch16_224')  # built and kept: one of the others must go
    assert [name for name in names if paths[name].exists()] == ['resnet18', 'vit_tiny_patch16_224']
    assert builds == names + ['vit_tiny_patch16_224']


def test_a_model_that_cannot_be_pickled_is_built_every_time(empty_cache_dir):
    def build():
        with torch.device('meta'):
            model = nn.Linear(2, 3)
        model.register_forward_hook(lambda module, inputs, output: None)  # a local function: not picklable
        return model

    assert isinstance(skeletons.load_or_build('linear', build), nn.Linear)
    assert not skeletons.folder().exists() or not list(skeletons.folder().glob('*.pkl'))
