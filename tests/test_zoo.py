"""Weight resolution: the paper's ViT-L/16 files, loading by assignment on the meta device, downloads."""
import dataclasses
import functools
import http.server
import os
import threading
from collections import OrderedDict

import pytest
import timm
import torch
from timm.models import _registry

from t2t_viz import zoo
from t2t_viz.cli import main
from t2t_viz.models import PAPER_VIT_TAG

PAPER_VIT = 'vit_large_patch16_384.orig_in21k_ft_in1k'


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')


def test_paper_vit_names_resolve_to_the_original_release_files():
    assert PAPER_VIT in timm.list_pretrained('vit_large_patch16_384*')
    cfg = timm.models.get_pretrained_cfg(PAPER_VIT)
    assert cfg.url.endswith('/v0.1-vitjx/jx_vit_large_p16_384-b3be5167.pth')
    assert (cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct) == ((3, 384, 384), (0.5,) * 3, (0.5,) * 3, 1.0)
    cfg_224 = timm.models.get_pretrained_cfg(f'vit_large_patch16_224.{PAPER_VIT_TAG}')
    assert cfg_224.url.endswith('jx_vit_large_p16_224-4ee7a4dc.pth') and cfg_224.input_size == (3, 224, 224)
    remote = zoo.remote_weights(PAPER_VIT)
    assert (remote.filename, remote.sha256_prefix) == ('jx_vit_large_p16_384-b3be5167.pth', 'b3be5167')
    assert zoo.remote_weights('vit_large_patch16_384').filename == remote.filename  # the bare name means it
    names = [p.name for p in zoo.checkpoint_candidates(PAPER_VIT)]
    assert 'jx_vit_large_p16_384-b3be5167.pth' in names and f'{PAPER_VIT}.safetensors' in names
    assert zoo.PRESETS['paper'] == ('resnet50.tv_in1k', PAPER_VIT, 't2t_vit_24.in1k')


def _random_state_dict(name: str) -> OrderedDict:
    """Random tensors with the names and shapes of the model's state dict, made without building it."""
    torch.manual_seed(0)
    return OrderedDict((k, torch.randn(v.shape) * 0.02 if v.is_floating_point()
                        else torch.zeros(v.shape, dtype=v.dtype))
                       for k, v in zoo.build_on_meta(name).state_dict().items())


def test_paper_vit_loads_from_a_file_in_the_2021_layout(tmp_path):
    """A plain state dict in timm's 2021 ViT names, saved in torch's legacy format, as the release file."""
    state_dict = _random_state_dict(PAPER_VIT)
    assert 'pre_logits.fc.weight' not in state_dict and state_dict['pos_embed'].shape == (1, 577, 1024)
    torch.save(state_dict, tmp_path / 'jx_vit_large_p16_384-b3be5167.pth', _use_new_zipfile_serialization=False)
    loaded = zoo.load(PAPER_VIT, device='cpu', checkpoint_dir=tmp_path)
    assert loaded.weights.source == 'file' and loaded.weights.location.endswith('jx_vit_large_p16_384-b3be5167.pth')
    assert loaded.request == PAPER_VIT and loaded.img_size == 384
    assert (loaded.data_config['mean'], loaded.data_config['crop_pct']) == ((0.5, 0.5, 0.5), 1.0)
    assert torch.equal(loaded.model.blocks[7].attn.qkv.weight, state_dict['blocks.7.attn.qkv.weight'])
    assert torch.equal(loaded.model.pos_embed, state_dict['pos_embed'])
    del loaded
    at_224 = zoo.load(PAPER_VIT, img_size=224, device='cpu', checkpoint_dir=tmp_path)
    assert at_224.model.pos_embed.shape == (1, 197, 1024)  # position table resampled from 24x24 to 14x14
    torch.testing.assert_close(at_224.model.pos_embed[:, 0], state_dict['pos_embed'][:, 0])  # class row kept
    with torch.inference_mode():
        assert at_224.model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def _ordinary(name: str, path) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224', 't2t_vit_7', 'levit_128s'])
def test_loading_by_assignment_gives_the_logits_of_the_ordinary_path(tmp_path, name):
    """No random initialisation for loaded weights; buffers not in the file (levit's indices) are still right."""
    torch.manual_seed(1)
    source = timm.create_model(name).eval()
    path = tmp_path / f'{name}.pth'
    torch.save(source.state_dict(), path)
    loaded = zoo.load(name, device='cpu', checkpoint_dir=tmp_path)
    assert loaded.weights.source == 'file'
    assert not any(t.is_meta for t in list(loaded.model.parameters()) + list(loaded.model.buffers()))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), _ordinary(name, path)(x), rtol=0, atol=0)


def _real_state_dict(model: torch.nn.Module, keep_batch_counters: bool = True) -> dict:
    torch.manual_seed(4)
    return {k: torch.randn(v.shape) if v.is_floating_point() else torch.full(v.shape, 7, dtype=v.dtype)
            for k, v in model.state_dict().items() if keep_batch_counters or not k.endswith('num_batches_tracked')}


def _assigned(model: torch.nn.Module, state_dict: dict) -> dict:
    """Per tensor: its kind, and whether it is the state dict's own tensor (else its value)."""
    return {k: (type(v), v.requires_grad, v.dtype, v.shape,
                v.data_ptr() == state_dict[k].data_ptr() if k in state_dict else v.tolist())
            for k, v in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224', 't2t_vit_7', 'efficientnet_b0', 'convnext_atto'])
@pytest.mark.parametrize('keep_batch_counters', [True, False])
def test_assignment_does_what_torch_load_state_dict_does(name, keep_batch_counters):
    """Parameters stay parameters, buffers buffers, tensors are the file's own; files from before batch
    counters existed get zero, as in torch."""
    ours, torchs = zoo.build_on_meta(name), zoo.build_on_meta(name)
    assert all(map(zoo._loads_plainly, ours.modules()))  # assigned by t2t-viz, not handed to torch
    state_dict = _real_state_dict(ours, keep_batch_counters)
    zoo._assign(ours, state_dict)
    torchs.load_state_dict(state_dict, strict=True, assign=True)
    assert _assigned(ours, state_dict) == _assigned(torchs, state_dict)
    counters = [int(b) for n, b in ours.named_buffers() if n.endswith('num_batches_tracked')]
    assert set(counters) <= {7 if keep_batch_counters else 0}


def test_files_that_do_not_fit_the_model_are_refused_with_what_is_wrong(tmp_path):
    state_dict = _real_state_dict(zoo.build_on_meta('resnet18'))
    del state_dict['fc.weight']
    state_dict['head.weight'] = torch.zeros(1)
    state_dict['conv1.weight'] = torch.zeros(64, 3, 3, 3)
    torch.save(state_dict, tmp_path / 'resnet18.pth')
    with pytest.raises(zoo.WeightsError, match=r'resnet18.pth: not usable weights for resnet18 \(1 tensors missing '
                                               r'\(e.g. fc.weight\); 1 not in the model \(e.g. head.weight\); 1 of '
                                               r'another shape \(e.g. conv1.weight is \(64, 3, 3, 3\) in the file, '
                                               r'\(64, 3, 7, 7\) in the model\)\)'):
        zoo.load('resnet18', device='cpu', checkpoint_dir=tmp_path)


def test_modules_with_load_hooks_are_loaded_by_torch():
    class FileNamesItW(torch.nn.Linear):
        """Its files call the weight ``w``: a load hook renames it, which only torch's loading runs."""

        def __init__(self):
            super().__init__(2, 3, device='meta')
            self._register_load_state_dict_pre_hook(self._rename)

        @staticmethod
        def _rename(state_dict, prefix, *args):
            state_dict[f'{prefix}weight'] = state_dict.pop(f'{prefix}w')

    model = torch.nn.Sequential(FileNamesItW())
    weight, bias = torch.randn(3, 2), torch.randn(3)
    zoo._assign(model, {'0.w': weight, '0.bias': bias})
    assert torch.equal(model[0].weight, weight) and torch.equal(model[0].bias, bias)


@pytest.mark.parametrize('name', ['resnet18', 't2t_vit_7'])
def test_building_on_meta_runs_no_initialisation(name, aten_ops, empty_cache_dir):
    """No in-place write reaches a kernel, also from torch.nn.init (which passes its tensor by keyword)."""
    with aten_ops() as ops:
        model = zoo.build_on_meta(name)
    assert all(t.is_meta for t in model.state_dict().values())
    written = sorted({n for n in ops.names if n.endswith('_') and not n.startswith('_')})
    assert written == [], written


@pytest.mark.skipif(not os.path.exists('/proc/self/maps'), reason='needs Linux /proc')
@pytest.mark.parametrize('zip_format', [True, False])
def test_weights_are_mapped_from_the_file_not_copied(tmp_path, zip_format):
    """Zip-format files are mapped (no copy in the heap); legacy-format ones, which cannot be, are read."""
    torch.manual_seed(2)
    source = timm.create_model('resnet18').eval()
    path = tmp_path / 'resnet18.pth'
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    loaded = zoo.load('resnet18', device='cpu', checkpoint_dir=tmp_path)
    with open('/proc/self/maps') as maps:
        assert (str(path) in maps.read()) == zip_format
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)


def test_half_precision_file_gives_a_float32_model(tmp_path):
    source = timm.create_model('resnet18').eval()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()},
               tmp_path / 'resnet18.pth')
    loaded = zoo.load('resnet18', device='cpu', checkpoint_dir=tmp_path)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


@pytest.fixture
def served(tmp_path):
    """A local HTTP server for files put in the returned folder; yields (folder, base URL)."""
    folder = tmp_path / 'served'
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()


def test_download_goes_to_the_checkpoint_folder_with_progress(tmp_path, served, monkeypatch):
    folder, base = served
    source = timm.create_model('t2t_vit_7').eval()
    torch.save({'state_dict_ema': source.state_dict()}, folder / '71.7_T2T_ViT_7.pth.tar')
    local = dataclasses.replace(_registry._model_pretrained_cfgs['t2t_vit_7'], url=f'{base}/71.7_T2T_ViT_7.pth.tar')
    for key in ('t2t_vit_7', 't2t_vit_7.in1k'):  # the default tag is registered under both names
        monkeypatch.setitem(_registry._model_pretrained_cfgs, key, local)
    checkpoints = tmp_path / 'checkpoints'
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(checkpoints))
    assert zoo.weights_status('t2t_vit_7').source == 'random'
    with pytest.raises(zoo.WeightsError, match='T2T_VIZ_OFFLINE=1'):
        zoo.download('t2t_vit_7')
    monkeypatch.delenv('T2T_VIZ_OFFLINE')
    seen = []
    status = zoo.download('t2t_vit_7', progress=lambda done, total: seen.append((done, total)))
    assert status.source == 'file' and status.location == str(checkpoints / '71.7_T2T_ViT_7.pth.tar')
    size = (folder / '71.7_T2T_ViT_7.pth.tar').stat().st_size
    assert seen[-1] == (size, size)
    loaded = zoo.load('t2t_vit_7', device='cpu')
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(loaded.model(x), source(x))


def test_weights_command_lists_every_preset_and_says_why_nothing_was_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(tmp_path))
    assert main(['weights']) == 0
    out = capsys.readouterr().out
    for name in set(zoo.PRESETS['paper'] + zoo.PRESETS['timm']):
        assert name in out
    assert 'jx_vit_large_p16_384-b3be5167.pth' in out  # where to put the paper's file
    assert main(['weights', '--download', '--model', 't2t_vit_7']) == 1
    assert 'offline mode: T2T_VIZ_OFFLINE=1' in capsys.readouterr().out
