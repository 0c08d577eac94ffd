"""Where layers come from: points in execution order, other timm models, and the notebook procedure's families."""
import pytest
import timm
import torch

from t2t_viz import capture, kernels, procedures, zoo
from t2t_viz.cli import main
from t2t_viz.pipeline import inspect_images, layer_labels
from t2t_viz.stats import StatisticsReduce, layer_stats


@pytest.mark.parametrize('name, mlp_hidden', [('resnet18', False), ('resnet50', False),
                                              ('vit_tiny_patch16_224', True), ('t2t_vit_7', True)])
def test_points_are_in_execution_order(name, mlp_hidden, cloned_outputs):
    model = timm.create_model(name).eval()
    points = capture.layer_points(model, 224, 224, mlp_hidden)
    names = [p.module_name for p in points]
    assert list(cloned_outputs(model, torch.randn(1, 3, 224, 224), names)) == names  # keys in firing order


def test_stopping_early_keeps_every_requested_layer():
    model = timm.create_model('resnet18').eval()
    captured = capture.run(model, torch.randn(1, 3, 64, 64), layers=['layer1', 'conv2'], stop_early=True)[0]
    assert [layer.name for layer in captured.layers] == ['layer1.0.act1', 'layer1']
    assert captured.logits is None


def test_a_stage_reuses_its_last_relus_records_only_when_it_is_that_very_output(cloned_outputs):
    """Statistics and display copy (float16, pooled where over 16 pixels) made once for both points."""
    model = timm.create_model('resnet18').eval()
    x = torch.randn(1, 3, 128, 128)
    calls = []

    def reduce(fmap, prefix):
        calls.append(fmap.shape)
        return layer_stats(fmap)

    def run():
        return capture.run(model, x, dtype=torch.float16, max_side=16, reduce=reduce)[0]

    layers = run()
    assert len(calls) == len(layers.layers) - 4  # the four stage outputs are their last ReLUs' outputs
    reference = cloned_outputs(model, x, ['layer1', 'layer2'])
    for stage_name, relu_name, side in [('layer1', 'layer1.1.act2', 16), ('layer2', 'layer2.1.act2', 16)]:
        stage, last_relu = layers.layer(stage_name), layers.layer(relu_name)
        assert stage.stats is last_relu.stats and stage.fmap.data_ptr() == last_relu.fmap.data_ptr()
        expected = torch.nn.functional.adaptive_avg_pool2d(reference[stage_name], side)[0].half()
        torch.testing.assert_close(stage.fmap, expected, rtol=1e-3, atol=1e-3)
    handle = model.layer1.register_forward_hook(lambda module, inputs, output: output * 2)  # a new tensor
    try:
        calls.clear()
        doubled = run()
    finally:
        handle.remove()
    assert len(calls) == len(doubled.layers) - 3
    stage, last_relu = doubled.layer('layer1'), doubled.layer('layer1.1.act2')
    assert stage.stats is not last_relu.stats and stage.fmap.data_ptr() != last_relu.fmap.data_ptr()
    torch.testing.assert_close(stage.fmap.float(), 2 * last_relu.fmap.float())


OTHER_FAMILIES = ['convnext_atto', 'efficientnet_b0', 'mobilenetv3_small_100']


@pytest.mark.parametrize('name', OTHER_FAMILIES)
def test_other_timm_models_honour_the_display_options(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 256, 256)
    count = capture.intermediate_count(model)
    with torch.inference_mode():
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert len(expected) == count
    seen = []
    full = capture.run(model, x, dtype=torch.float16, max_side=8, reduce=layer_stats,
                       progress=lambda done, total: seen.append((done, total)))[0]
    assert [layer.label for layer in full.layers] == [f'stage {i + 1}' for i in range(count)]
    assert seen == [(i + 1, count) for i in range(count)] and full.logits is not None
    for layer, map_ in zip(full.layers, expected):
        assert layer.shape == tuple(map_.shape[1:])  # statistics and shapes from the full map
        assert max(layer.fmap.shape[1:]) <= 8 and layer.fmap.dtype == torch.float16
        assert float(layer.stats.channels.max_abs.max()) == pytest.approx(float(map_.abs().max()), rel=1e-5)
    second = f'stage {min(2, count)}'
    early = capture.run(model, x, layers=[second], stop_early=True)[0]
    assert [layer.label for layer in early.layers] == [second] and early.logits is None
    torch.testing.assert_close(early.layers[0].fmap, expected[min(2, count) - 1][0])


def _loaded(name, img_size=64):
    from timm.data import resolve_data_config
    model = timm.create_model(name).eval()
    return zoo.LoadedModel(name, model, zoo.WeightsInfo('random', False), resolve_data_config(model=model),
                           img_size=img_size)


NOTEBOOK_FAMILIES = {  # name: whether the paper's notebook procedure is defined for it
    'resnet18': True, 'resnet50d': True, 'seresnet50': True, 'resnext26ts': False, 'vit_tiny_patch16_224': True,
    'deit_tiny_distilled_patch16_224': True, 't2t_vit_7': True, 'efficientnet_b0': False,
    'mobilenetv3_small_100': False, 'convnext_atto': False, 'regnetx_002': False, 'densenet121': False,
    'swin_tiny_patch4_window7_224': False,
}


@pytest.mark.parametrize('name', sorted(NOTEBOOK_FAMILIES))
def test_notebook_procedure_runs_or_refuses_in_one_line(name, chelsea):
    loaded = _loaded(name, 224 if 'vit' in name or 'swin' in name or 'deit' in name else 64)
    if NOTEBOOK_FAMILIES[name]:
        result = inspect_images(loaded, [chelsea], procedure=procedures.PAPER_NOTEBOOK, layers=None)[0]
        assert result.summaries and result.procedure in (procedures.PAPER_NOTEBOOK, procedures.NOTEBOOK_ANALOGUE)
        assert [s.label for s in result.summaries] == layer_labels(loaded, procedures.PAPER_NOTEBOOK)
        return
    for attempt in (lambda: layer_labels(loaded, procedures.PAPER_NOTEBOOK),
                    lambda: inspect_images(loaded, [chelsea], procedure=procedures.PAPER_NOTEBOOK)):
        with pytest.raises(ValueError) as error:
            attempt()
        message = str(error.value)
        assert '\n' not in message and type(loaded.model).__name__ in message and 'ResNets, ViTs' in message


def test_seresnet_chain_leaves_out_the_squeeze_excitation_convs():
    model = timm.create_model('seresnet50')
    names = [name for name, _ in procedures.main_path_convs(model)]
    assert len(names) == 49 and not any('.se.' in name for name in names)
    assert len(procedures.main_path_convs(timm.create_model('resnet50d'))) == 51  # a deep stem of three convs


def test_cli_refuses_the_notebook_procedure_for_other_families(tmp_path, chelsea, capsys, monkeypatch):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    chelsea.save(tmp_path / 'cat.png')
    for command in (['stats', str(tmp_path / 'cat.png'), '-o', str(tmp_path / 's.csv')],
                    ['figure2', str(tmp_path / 'cat.png'), '-o', str(tmp_path / 'f.png')]):
        assert main(command + ['--model', 'efficientnet_b0', '--procedure', 'paper_notebook', '--img-size',
                               '64']) == 2
        error = capsys.readouterr().err  # the weights line, then one line of error
        assert error.splitlines()[-1].startswith('error: efficientnet_b0: the paper') and 'Traceback' not in error


@pytest.mark.parametrize('reduce', [None, layer_stats, StatisticsReduce()])
def test_float16_display_copies_clamp_only_values_beyond_its_range(cloned_outputs, reduce):
    """Kept float16 maps: values past 65504 become +-65504 instead of inf; a map in range is the plain
    conversion; NaN stays NaN beside a clamped infinity. With statistics (as the app captures), their largest
    |x| decides whether the copy is read again, or (StatisticsReduce, as the app reduces) the kernels write
    the copy as they read the map: the same copies every way, in a pass's own buffers and in reused ones."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    reference = cloned_outputs(model, x, ['act1', 'layer1.0.act1'])
    original = model.conv1.weight.detach().clone()
    with torch.no_grad():
        model.conv1.weight.mul_(1e6)  # act1 far beyond float16's range; later layers are batch-normed back
    huge = cloned_outputs(model, x, ['act1'])['act1'][0]
    layers = {layer.name: layer for layer in capture.run(model, x, dtype=torch.float16, reduce=reduce)[0].layers}
    kept = layers['act1'].fmap
    assert float(huge.max()) > 1e6 and not torch.isinf(kept).any() and float(kept.max()) == 65504.0
    assert torch.equal(kept, huge.half().clamp(-65504, 65504))
    with torch.no_grad():
        model.conv1.weight.copy_(original)
    in_range = {layer.name: layer for layer in capture.run(model, x, dtype=torch.float16, reduce=reduce)[0].layers}
    assert torch.equal(in_range['layer1.0.act1'].fmap, reference['layer1.0.act1'][0].half())
    written = [getattr(layer.stats, 'copied_float16', False) for run in (layers, in_range) for layer in run.values()]
    assert all(written) == (isinstance(reduce, StatisticsReduce) and kernels._HARDWARE_FLOAT16)
    mixed = torch.tensor([[[1e6, float('nan'), -1e6]]])
    assert capture._beyond_float16(mixed.half()) and not capture._beyond_float16(torch.tensor([[[65504.0]]]).half())
    assert capture._within_float16([layer_stats(torch.tensor([[[65504.0, -3.0]]]))] * 2)
    assert not capture._within_float16([layer_stats(torch.tensor([[[1.0, -70000.0]]]))])
    assert not capture._within_float16([layer_stats(torch.tensor([[[1.0, float('nan')]]]))])
    assert not capture._within_float16([None])  # no statistics: the copy is read


class _CappedReLU(torch.nn.ReLU):
    def forward(self, x):
        return x.clamp(0.0, 0.25)


def test_a_module_replaced_after_a_capture_is_hooked_in_the_next():
    """Hook points are found once per model and input size; a module swapped in later is still recorded."""
    model = timm.create_model('resnet18').eval()
    x = torch.randn(1, 3, 64, 64)
    first = capture.run(model, x)[0]
    model.layer1[0].act1 = _CappedReLU()
    second = capture.run(model, x)[0]
    assert [layer.name for layer in second.layers] == [layer.name for layer in first.layers]
    assert float(first.layer('layer1.0.act1').fmap.max()) > 0.25
    assert float(second.layer('layer1.0.act1').fmap.max()) == 0.25


def test_a_block_replaced_whole_after_a_capture_is_hooked_in_the_next():
    """The old block still holds its old ReLUs, so only the stage's own entry for the block tells."""
    import copy
    model = timm.create_model('resnet18').eval()
    x = torch.randn(1, 3, 64, 64)
    first = capture.run(model, x)[0]
    block = copy.deepcopy(model.layer2[1])
    block.act2 = _CappedReLU()
    model.layer2[1] = block
    second = capture.run(model, x)[0]
    assert float(first.layer('layer2.1.act2').fmap.max()) > 0.25
    assert float(second.layer('layer2.1.act2').fmap.max()) == 0.25


def test_a_captured_model_is_freed_once_its_last_user_lets_it_go():
    """The caches of hook points and copy sizes key models weakly and never hold them."""
    import gc
    import weakref
    model = timm.create_model('resnet18').eval()
    capture.run(model, torch.randn(1, 3, 64, 64), dtype=torch.float16, max_side=16)
    capture.run(model, torch.randn(1, 3, 64, 64), dtype=torch.float16, max_side=16)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_a_block_removed_after_a_capture_is_left_out_of_the_next():
    model = timm.create_model('resnet18').eval()
    x = torch.randn(1, 3, 64, 64)
    assert 'layer4.1.act2' in [layer.name for layer in capture.run(model, x)[0].layers]
    del model.layer4[1]
    names = [layer.name for layer in capture.run(model, x)[0].layers]
    assert 'layer4.0.act2' in names and not any(name.startswith('layer4.1.') for name in names)
