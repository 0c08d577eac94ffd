"""Loading T2T-ViT release files in every layout they come in, and refusing what is not one."""
import argparse
import functools
import http.server
import os
import threading
from collections import OrderedDict

import pytest
import timm
import torch
from safetensors.torch import save_file

from t2t_viz.models import CheckpointError, checkpoint_filter_fn, read_checkpoint


@pytest.fixture(scope='module')
def source_model():
    torch.manual_seed(42)
    model = timm.create_model('t2t_vit_7').eval()
    with torch.no_grad():  # non-trivial norms so a silently skipped tensor changes the logits
        for name, p in model.named_parameters():
            if name.endswith('norm1.weight') or name.endswith('norm2.weight'):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope='module')
def image():
    torch.manual_seed(7)
    return torch.randn(2, 3, 224, 224)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _training_checkpoint(**weights):
    """The layout timm's CheckpointSaver wrote for the release: weights + optimizer + argparse args."""
    return dict(
        epoch=309, arch='t2t_vit_7', version=2, metric=71.7,
        args=argparse.Namespace(model='t2t_vit_7', img_size=224, lr=1e-3, mean=None),
        optimizer={'state': {}, 'param_groups': [{'lr': 1e-3, 'params': [0, 1]}]},
        **weights)


def _layouts(sd):
    noisy = OrderedDict((k, v + 1.0 if v.is_floating_point() else v) for k, v in sd.items())
    module_prefixed = OrderedDict(('module.' + k, v) for k, v in sd.items())
    return {
        'plain': sd,
        'state_dict': {'state_dict': sd},
        'ema_preferred': _training_checkpoint(state_dict=noisy, state_dict_ema=sd),
        'module_prefix': _training_checkpoint(state_dict=module_prefixed),
        'ema_with_module_prefix': {'state_dict': noisy, 'state_dict_ema': module_prefixed},
    }


@pytest.mark.parametrize('layout', ['plain', 'state_dict', 'ema_preferred', 'module_prefix',
                                    'ema_with_module_prefix'])
def test_every_layout_round_trips(tmp_path, source_model, image, layout):
    sd = source_model.state_dict()
    path = tmp_path / f'{layout}.pth.tar'
    torch.save(_layouts(sd)[layout], path)
    loaded = timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(_logits(loaded, image), _logits(source_model, image))


def test_safetensors_file(tmp_path, source_model, image):
    path = tmp_path / 't2t_vit_7.safetensors'
    save_file({k: v.contiguous() for k, v in source_model.state_dict().items()}, str(path))
    loaded = timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(_logits(loaded, image), _logits(source_model, image))


def test_timm_reader_path_also_round_trips(tmp_path, source_model, image):
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(_training_checkpoint(state_dict=source_model.state_dict()), path)
    loaded = timm.create_model(
        't2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
    assert torch.equal(_logits(loaded, image), _logits(source_model, image))


def test_filter_is_pure(source_model):
    sd = {'state_dict_ema': OrderedDict(('module.' + k, v) for k, v in source_model.state_dict().items())}
    before = list(sd['state_dict_ema'])
    out = checkpoint_filter_fn(sd, source_model)
    assert list(sd['state_dict_ema']) == before
    assert set(out) == set(source_model.state_dict())


def test_pretrained_downloads_release_url(tmp_path, source_model, image, capfd):
    """pretrained=True downloads (here from a server on 127.0.0.1) with a progress bar and caches the file."""
    timm.models.set_pretrained_download_progress(False)  # timm's default, whatever earlier tests set
    served = tmp_path / 'served'
    served.mkdir()
    torch.save(_training_checkpoint(state_dict_ema=source_model.state_dict()),
               served / '71.7_T2T_ViT_7.pth.tar')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}/71.7_T2T_ViT_7.pth.tar'
        cache = tmp_path / 'cache'
        loaded = timm.create_model('t2t_vit_7.in1k', pretrained=True, cache_dir=str(cache),
                                   pretrained_cfg_overlay=dict(url=url, custom_load=True))
    finally:
        server.shutdown()
    assert torch.equal(_logits(loaded, image), _logits(source_model, image))
    assert any(name.endswith('71.7_T2T_ViT_7.pth.tar') for _, _, files in os.walk(cache) for name in files)
    assert '100%' in capfd.readouterr().err  # torch.hub's tqdm bar, with timm's global progress flag left off


def test_384_checkpoint_resamples_position_grid(tmp_path, source_model, image):
    model_384 = timm.create_model('t2t_vit_7', img_size=384)
    model_384.load_state_dict(
        {**source_model.state_dict(), 'pos_embed': model_384.state_dict()['pos_embed']}, strict=True)
    assert model_384.state_dict()['pos_embed'].shape == (1, 577, 256)
    path = tmp_path / '384.pth.tar'
    torch.save({'state_dict_ema': model_384.state_dict(), 'args': argparse.Namespace(img_size=384)}, path)

    same = timm.create_model('t2t_vit_7', img_size=384, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(same.pos_embed, model_384.pos_embed)
    at_224 = timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert at_224.pos_embed.shape == (1, 197, 256)
    torch.testing.assert_close(at_224.pos_embed[:, 0], model_384.pos_embed[:, 0])  # class row kept
    assert _logits(at_224, image).shape == (2, 1000)
    wide = timm.create_model('t2t_vit_7', img_size=(224, 320), pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(path)))
    assert wide.pos_embed.shape == (1, 1 + 14 * 20, 256)


def test_other_num_classes_keeps_model_head(tmp_path, source_model):
    path = tmp_path / 'ckpt.pth'
    torch.save(source_model.state_dict(), path)
    model = timm.create_model('t2t_vit_7', num_classes=10, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.head.weight.shape == (10, 256)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source_model.blocks[3].mlp.fc1.weight)


def test_wrong_variant_names_file_and_keys(tmp_path):
    path = tmp_path / 't2t_vit_10.pth.tar'
    torch.save({'state_dict_ema': timm.create_model('t2t_vit_10').state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert str(path) in message and 'unexpected 33' in message and 'blocks.7.' in message

    performer_into_transformer = tmp_path / 'perf.pth'
    torch.save(timm.create_model('t2t_vit_14').state_dict(), performer_into_transformer)
    with pytest.raises(CheckpointError, match='missing .*tokens_to_token.attention1.attn.qkv.weight'):
        timm.create_model('t2t_vit_t_14', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(performer_into_transformer)))

    resnet = tmp_path / 'resnet.pth'
    torch.save(timm.create_model('resnet18').state_dict(), resnet)
    with pytest.raises(CheckpointError, match=r'resnet\.pth: not a checkpoint of this model \(missing'):
        timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(resnet)))


def test_shape_mismatch_is_listed(tmp_path):
    sd = timm.create_model('t2t_vit_7').state_dict()
    sd['blocks.0.mlp.fc1.weight'] = torch.zeros(3, 3)
    path = tmp_path / 'bad_shape.pth'
    torch.save(sd, path)
    mismatch = r'shape mismatch 1: blocks.0.mlp.fc1.weight \(3, 3\) vs model \(512, 256\)'
    with pytest.raises(CheckpointError, match=mismatch):
        timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_corrupt_and_truncated_files(tmp_path, source_model):
    garbage = tmp_path / 'garbage.pth.tar'
    garbage.write_bytes(b'this is not a checkpoint at all' * 10)
    good = tmp_path / 'good.pth'
    torch.save(source_model.state_dict(), good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:100_000])
    bad_safetensors = tmp_path / 'bad.safetensors'
    bad_safetensors.write_bytes(b'\x00' * 64)
    for path in (garbage, truncated, bad_safetensors):
        with pytest.raises(CheckpointError, match=f'{path.name}: (corrupt|not a)'):
            timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointError, match='no such checkpoint file'):
        read_checkpoint(tmp_path / 'missing.pth')


def test_pickle_with_foreign_global_is_refused(tmp_path, source_model):
    path = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': source_model.state_dict(), 'hook': os.system}, path)
    with pytest.raises(CheckpointError, match='evil.pth.tar: refused to load: .*system'):
        timm.create_model('t2t_vit_7', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
