"""The paper's notebook procedure: differs from the real forward pass exactly where the procedure does."""
import csv
import io

import pytest
import timm
import torch
from PIL import Image

from t2t_viz import capture, procedures, zoo
from t2t_viz.pipeline import inspect_images
from t2t_viz.stats import csv_text


@pytest.fixture(scope='module')
def resnet():
    torch.manual_seed(0)
    return timm.create_model('resnet18').eval()


def test_notebook_input_is_a_square_resize_without_normalization(chelsea):
    x = procedures.notebook_input([chelsea], 64)
    assert x.shape == (1, 3, 64, 64)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    expected = torch.tensor(list(chelsea.resize((64, 64), Image.BILINEAR).getpixel((10, 20)))) / 255
    torch.testing.assert_close(x[0, :, 20, 10], expected)


def test_resnet_chain_is_the_convs_alone(resnet, chelsea):
    x = procedures.notebook_input([chelsea], 128)
    notebook = procedures.run_notebook(resnet, x)[0]
    convs = procedures.main_path_convs(resnet)
    assert len(notebook.layers) == len(convs) == 17  # resnet18: 1 + 8 blocks x 2, no downsample convs
    assert notebook.procedure == procedures.PAPER_NOTEBOOK and notebook.logits is None
    assert [layer.label for layer in notebook.layers[:3]] == ['conv1', 'conv2', 'conv3']
    with torch.no_grad():
        conv1 = resnet.conv1(x)
        torch.testing.assert_close(notebook.layers[0].fmap, conv1[0], rtol=0, atol=0)
        # the real forward's conv1 is the same conv followed by BatchNorm and ReLU, on the same input
        real = capture.run(resnet, x, layers=['conv1'])[0].layers[0]
        torch.testing.assert_close(real.fmap, torch.relu(resnet.bn1(conv1))[0])
        assert not torch.allclose(real.fmap, notebook.layers[0].fmap)
        # conv2 is fed conv1's raw output directly: no max-pooling, so the map keeps conv1's 64x64 grid
        torch.testing.assert_close(notebook.layers[1].fmap, resnet.layer1[0].conv1(conv1)[0])
    assert notebook.layers[1].shape[1:] == (64, 64)
    assert capture.run(resnet, x)[0].layer('conv2').shape[1:] == (32, 32)  # real: after max-pooling


def test_vit_chain_has_no_class_token_and_no_positions(chelsea):
    torch.manual_seed(0)
    vit = timm.create_model('vit_tiny_patch16_224').eval()
    x = procedures.notebook_input([chelsea], 224)
    notebook = procedures.run_notebook(vit, x, layers=['patch tokens', 'block 1', 'block 2'])[0]
    real = capture.run(vit, x, layers=['patch tokens', 'block 1'])[0]
    with torch.no_grad():
        tokens = vit.patch_embed(x)  # (1, 196, 192), no class token, no position embedding
        block1 = vit.blocks[0](tokens)
        block2 = vit.blocks[1](block1)
    to_map = lambda t: t[0].t().reshape(192, 14, 14)  # noqa: E731
    torch.testing.assert_close(notebook.layer('patch tokens').fmap, to_map(tokens))
    torch.testing.assert_close(notebook.layer('block 1').fmap, to_map(block1))
    torch.testing.assert_close(notebook.layer('block 2').fmap, to_map(block2))
    torch.testing.assert_close(real.layer('patch tokens').fmap, notebook.layer('patch tokens').fmap)  # same step
    assert not torch.allclose(real.layer('block 1').fmap, notebook.layer('block 1').fmap, atol=1e-3)


def test_notebook_chain_stops_after_the_last_requested_layer(chelsea):
    vit = timm.create_model('vit_tiny_patch16_224').eval()
    calls = []
    handle = vit.blocks[5].register_forward_hook(lambda *args: calls.append(1))
    try:
        procedures.run_notebook(vit, procedures.notebook_input([chelsea], 224), layers=['block 2'])
        assert not calls
        procedures.run_notebook(vit, procedures.notebook_input([chelsea], 224), layers=['block 6'])
        assert calls
    finally:
        handle.remove()


def test_t2t_analogue_shares_the_t2t_module_and_drops_class_token_and_positions(chelsea):
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7').eval()
    x = procedures.notebook_input([chelsea], 224)
    notebook = procedures.run_notebook(model, x)[0]
    real = capture.run(model, x)[0]
    assert notebook.procedure == procedures.NOTEBOOK_ANALOGUE
    assert [layer.label for layer in notebook.layers] == [layer.label for layer in real.layers]
    for label in ('soft split 1', 'restructurization 2', 'T2T tokens'):
        torch.testing.assert_close(notebook.layer(label).fmap, real.layer(label).fmap)
    with torch.no_grad():
        expected = model.blocks[0](model.tokens_to_token(x))  # no class token, no position table
    torch.testing.assert_close(notebook.layer('block 1').fmap, expected[0].t().reshape(256, 14, 14))
    assert not torch.allclose(notebook.layer('block 1').fmap, real.layer('block 1').fmap, atol=1e-3)


def test_both_procedures_through_the_pipeline_and_csv(resnet, chelsea):
    info = zoo.WeightsInfo('random', False)
    from timm.data import resolve_data_config
    loaded = zoo.LoadedModel('resnet18', resnet, info, resolve_data_config(model=resnet), img_size=160)
    real = inspect_images(loaded, [chelsea], layers=['conv1', 'conv9'])[0]
    notebook = inspect_images(loaded, [chelsea], layers=['conv1', 'conv9'], procedure=procedures.PAPER_NOTEBOOK)[0]
    assert [s.label for s in real.summaries] == [s.label for s in notebook.summaries] == ['conv1', 'conv9']
    assert float(real.summaries[0].stats.minimum.min()) >= 0  # after ReLU
    assert float(notebook.summaries[0].stats.minimum.min()) < 0  # the bare conv
    assert notebook.top5 == [] and len(real.top5) == 5
    rows = list(csv.DictReader(io.StringIO(csv_text(real.rows('cat.png') + notebook.rows('cat.png')))))
    assert [r['procedure'] for r in rows] == ['real_forward'] * 2 + ['paper_notebook'] * 2
    assert rows[2]['layer'] == 'conv1' and rows[0]['layer'] == 'act1'  # the conv itself vs its ReLU


def test_procedure_of_and_unknown_procedure():
    t2t = timm.create_model('t2t_vit_7')
    assert procedures.procedure_of(t2t, procedures.PAPER_NOTEBOOK) == procedures.NOTEBOOK_ANALOGUE
    assert procedures.procedure_of(t2t, capture.REAL_FORWARD) == capture.REAL_FORWARD
    with pytest.raises(ValueError, match='procedure must be'):
        procedures.procedure_of(t2t, 'guesswork')
    assert 'none was released' in procedures.describe(procedures.NOTEBOOK_ANALOGUE)


def test_notebook_options_kinds_and_procedure_names(resnet, chelsea):
    assert procedures.procedure_of(resnet, procedures.NOTEBOOK_ANALOGUE) == procedures.PAPER_NOTEBOOK
    procedures.check_supported(resnet)  # a ResNet is supported: nothing raised
    x = procedures.notebook_input([chelsea.convert('RGBA'), chelsea.convert('L')], 96)
    assert x.shape == (2, 3, 96, 96) and x.dtype == torch.float32  # any mode in, RGB in [0, 1] out
    seen = []
    captures = procedures.run_notebook(resnet, x, dtype=torch.float16, max_side=16, layers=['conv1', 'conv2'],
                                       reduce=lambda fmap, prefix: float(fmap.abs().max()),
                                       progress=lambda done, total: seen.append((done, total)))
    first = captures[0].layers[0]
    assert [layer.kind for layer in captures[0].layers] == ['conv', 'conv'] and seen == [(1, 2), (2, 2)]
    assert first.fmap.dtype == torch.float16 and first.fmap.shape[1:] == (16, 16) and first.shape[1:] == (48, 48)
    with torch.no_grad():
        assert first.stats == pytest.approx(float(resnet.conv1(x)[0].abs().max()), rel=1e-6)
    assert procedures.run_notebook(resnet, x, layers=[])[0].layers == []


def test_notebook_kinds_of_token_models_and_dynamic_sizes(chelsea):
    vit = timm.create_model('vit_tiny_patch16_224', dynamic_img_size=True).eval()  # its patch embedding is NHWC
    x = procedures.notebook_input([chelsea], 160)
    layers = procedures.run_notebook(vit, x, layers=['patch tokens', 'block 1'])[0].layers
    assert [(layer.kind, layer.shape) for layer in layers] == [('patch_embed', (192, 10, 10)), ('block', (192, 10, 10))]
    with torch.no_grad():
        tokens = vit.patch_embed(x).flatten(1, 2)  # (1, 100, 192)
    torch.testing.assert_close(layers[0].fmap, tokens[0].t().reshape(192, 10, 10))
    t2t = timm.create_model('t2t_vit_7').eval()
    kinds = {layer.kind for layer in procedures.run_notebook(t2t, procedures.notebook_input([chelsea], 224))[0].layers}
    assert kinds == {'soft_split', 'restructurization', 'projection', 'block'}


def test_a_resnet_whose_convs_do_not_chain_is_refused_in_one_line():
    class Mismatched(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3)
            self.layer1 = torch.nn.Sequential(torch.nn.Module())
            self.layer1[0].conv1 = torch.nn.Conv2d(5, 8, 1)  # fed from a stem of 8 channels: no chain
            self.layer4 = torch.nn.Identity()

    with pytest.raises(ValueError, match=r'^layer1\.0\.conv1 takes 5 channels but the previous conv gives 8: '
                                         r'the notebook chain does not apply to this model$'):
        procedures.run_notebook(Mismatched(), torch.rand(1, 3, 16, 16))
