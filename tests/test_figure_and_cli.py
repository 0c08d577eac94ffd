"""The Figure 2 composite, and the command line's procedures, picture modes, memory-aware batches and
`prepare`."""
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from t2t_viz import allocator, kernels, memory, pipeline, zoo
from t2t_viz.capture import Layer
from t2t_viz.cli import main
from t2t_viz.dataset import fitting_batch
from t2t_viz.pipeline import display_estimate, memory_estimate
from t2t_viz.figure import Panel, compose, figure_layers
from t2t_viz.render import DEAD_COLOR
from t2t_viz.stats import summarize

SMALL = ['--model', 'resnet18', '--model', 'vit_tiny_patch16_224', '--model', 't2t_vit_7']


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(tmp_path / 'no-checkpoints'))


@pytest.fixture
def cat(tmp_path, chelsea):
    path = tmp_path / 'cat.png'
    chelsea.save(path)
    return path


def test_figure_layers_are_the_papers_pairs():
    assert figure_layers(['conv1', 'conv2'] + [f'conv{i}' for i in range(3, 50)]) == ('conv1', 'conv25')
    assert figure_layers(['patch tokens'] + [f'block {i}' for i in range(1, 25)]) == ('block 1', 'block 12')
    assert figure_layers(['soft split 1', 'block 1', 'block 2', 'block 3', 'block 4']) == ('block 1', 'block 3')


def test_compose_panels_of_equal_size_with_dead_channels_outlined():
    small = torch.randn(40, 14, 14)
    small[0] = 0  # dead, outlined red
    large = torch.rand(64, 112, 112)
    panels = [[Panel('m1', Layer('a', 'block', 0, small, 'block 1'), summarize(Layer('a', 'block', 0, small)),
                     'real_forward', 'trained'),
               Panel('m1', Layer('b', 'relu', 1, large, 'conv25'), summarize(Layer('b', 'relu', 1, large)),
                     'real_forward', 'random')]]
    picture = compose(panels, channels=9, cell=32, heading='test')
    assert picture.dtype == np.uint8 and picture.ndim == 3
    red = np.all(picture == DEAD_COLOR, axis=-1)
    left_half = red[:, :picture.shape[1] // 2]
    assert left_half.any() and not red[:, picture.shape[1] // 2:].any()  # only the dead channel's frame
    assert compose(panels, mode='pca').shape[0] > 100
    with pytest.raises(ValueError, match='mode'):
        compose(panels, mode='pie')


def test_figure2_command_both_procedures(cat, tmp_path, capsys):
    real, notebook = tmp_path / 'real.png', tmp_path / 'notebook.png'
    assert main(['figure2', str(cat), '-o', str(real), '--img-size', '224', '--channels', '16', *SMALL]) == 0
    out = capsys.readouterr().out
    assert 'resnet18 · conv1 · 112x112' in out and 'vit_tiny_patch16_224 · block 12 · 14x14' in out
    assert 't2t_vit_7 · block 1 · 14x14' in out and 'RANDOM WEIGHTS' in out
    assert main(['figure2', str(cat), '-o', str(notebook), '--img-size', '224', '--procedure', 'paper_notebook',
                 *SMALL]) == 0
    assert 'paper_notebook' in capsys.readouterr().out
    assert Image.open(real).size[0] > 800 and Image.open(notebook).size[1] > 600


def test_render_modes(cat, tmp_path, capsys):
    for mode in ('grid', 'pca', 'norm'):
        png = tmp_path / f'{mode}.png'
        assert main(['render', str(cat), '--model', 't2t_vit_7', '--layer', 'block 3', '--mode', mode,
                     '-o', str(png)]) == 0
        assert Image.open(png).size[0] >= 200
    out = capsys.readouterr().out
    assert 'principal components' in out and 'high-norm' in out
    assert main(['render', str(cat), '--model', 'resnet18', '--layer', 'conv1', '--procedure', 'paper_notebook',
                 '-o', str(tmp_path / 'nb.png')]) == 0
    assert 'paper_notebook' in capsys.readouterr().out


def test_stats_with_both_procedures(cat, tmp_path):
    out = tmp_path / 'stats.csv'
    assert main(['stats', str(cat), '--model', 'resnet18', '--procedure', 'both', '-o', str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    by_procedure = {p: [r for r in rows if r['procedure'] == p] for p in ('real_forward', 'paper_notebook')}
    assert len(by_procedure['real_forward']) == 21 and len(by_procedure['paper_notebook']) == 17
    assert {r['label'] for r in by_procedure['paper_notebook']} <= {r['label'] for r in by_procedure['real_forward']}
    assert allocator._applied in (None, allocator.BATCHED_MMAP_THRESHOLD_BYTES)  # None without glibc: at 224 a
    # batch's blocks of tens of MiB stay in the heap


def test_batch_shrinks_to_fit_memory_or_is_refused(cat, tmp_path, monkeypatch, capsys):
    one_image = memory_estimate('t2t_vit_7', 448, 1, 'real_forward', mlp_hidden=False, keep_maps=False).peak
    assert fitting_batch('t2t_vit_7', 448, 8, 'real_forward', False, available=int(2.5 * one_image)) == 2
    with pytest.raises(memory.InsufficientMemory, match=r'needs about .* for one image, but only'):
        fitting_batch('t2t_vit_7', 448, 8, 'real_forward', False, available=one_image // 2)
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: int(2.5 * one_image))
    for i in range(3):
        Image.open(cat).save(tmp_path / f'{i}.png')
    out = tmp_path / 'stats.csv'
    assert main(['stats', str(tmp_path), '--model', 't2t_vit_7', '--img-size', '448', '-o', str(out)]) == 0
    assert 'using batches of 2' in capsys.readouterr().err
    assert len(list(csv.DictReader(out.open()))) == 4 * 13
    assert allocator._applied in (None, allocator.MMAP_THRESHOLD_BYTES)  # over 384: large blocks are unmapped


def test_prepare_keeps_what_the_apps_first_start_needs(empty_cache_dir, monkeypatch, capsys):
    assert main(['prepare', '--model', 'resnet18', '--model', 't2t_vit_7']) == 0
    out = capsys.readouterr().out
    assert 'resnet18' in out and 't2t_vit_7' in out and str(empty_cache_dir) in out
    assert ('statistics kernels compiled' in out) == kernels.fused_available()

    def not_again(*args, **kwargs):
        raise AssertionError('built or traced again')

    # what the app asks for on its first start (pages' estimate, then the load) is found, not made again
    monkeypatch.setattr(zoo, '_build_on_meta', not_again)
    monkeypatch.setattr(pipeline, '_trace_estimate', not_again)
    for name in ('resnet18', 't2t_vit_7'):
        assert display_estimate(name, 224).peak > 0
        assert zoo.load(name, img_size=224, device='cpu', allow_download=False).model.training is False

    assert main(['prepare', '--model', 'no_such_model', '--model', 'resnet18']) == 1
    assert "unknown model 'no_such_model'" in capsys.readouterr().out
    assert main(['prepare', '--img-size', '100']) == 2
    assert 'multiple of 16' in capsys.readouterr().err
