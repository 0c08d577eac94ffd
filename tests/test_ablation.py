"""Channel ablation: dead channels change nothing, a live channel's effect equals a model whose weights make
that channel zero (or constant), the shared model is never modified, and concurrent ablations stay apart."""
import copy
import csv
import io
import threading

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.data import resolve_data_config

from t2t_viz import zoo
from t2t_viz.ablation import ABLATION_COLUMNS, ablate, ablation_rows, choose_channels
from t2t_viz.cli import main
from t2t_viz.images import preprocess
from t2t_viz.procedures import PAPER_NOTEBOOK

from planted import resnet18_with_dead_stem_channels


@pytest.fixture(scope='module')
def photo():
    return Image.fromarray(data.coffee())


def _loaded(model: torch.nn.Module, name: str) -> zoo.LoadedModel:
    return zoo.LoadedModel(name, model.eval(), zoo.WeightsInfo('random', False), resolve_data_config(model=model))


def _resnet_with_dead_stem_channels(dead=(3, 7)) -> zoo.LoadedModel:
    return _loaded(resnet18_with_dead_stem_channels(dead), 'resnet18')


def _state(model: torch.nn.Module) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_ablating_dead_channels_leaves_every_logit_exactly_unchanged(photo):
    loaded = _resnet_with_dead_stem_channels()
    before_state = _state(loaded.model)
    for layer, mode in (('conv1', 'zero'), ('act1', 'mean')):
        result = ablate(loaded, photo, layer, 'dead', mode)
        assert result.channels == [3, 7]
        assert torch.equal(result.before.capture.logits, result.after.capture.logits) and result.unchanged()
        assert result.kl_divergence() == 0.0 and result.top_logit_change() == 0.0
    assert all(torch.equal(v, before_state[k]) for k, v in loaded.model.state_dict().items())
    assert _hooks_left(loaded.model) == 0


def test_ablating_dead_patch_token_channels_of_a_vit_changes_nothing(photo):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224').eval()
    with torch.no_grad():  # channels 5 and 9 of every patch token are zero; the class token keeps its own
        model.patch_embed.proj.weight[[5, 9]] = 0.0
        model.patch_embed.proj.bias[[5, 9]] = 0.0
    result = ablate(_loaded(model, 'vit_tiny_patch16_224'), photo, 'patch tokens', 'dead')
    assert result.channels == [5, 9] and result.unchanged()


def test_zeroing_a_live_channel_equals_a_model_whose_weights_zero_it(photo):
    loaded = _resnet_with_dead_stem_channels(dead=())
    result = ablate(loaded, photo, 'conv1', '10,20')
    reference = copy.deepcopy(loaded.model)
    with torch.no_grad():
        reference.bn1.weight[[10, 20]] = 0.0
        reference.bn1.bias[[10, 20]] = 0.0  # ReLU(0) = 0: the same pass with the two channels zeroed
        expected = reference(preprocess(photo, loaded.data_config))[0]
    assert not result.unchanged()
    assert torch.allclose(result.after.capture.logits, expected, rtol=0, atol=1e-6)
    before = result.before.capture.logits.double().log_softmax(-1)
    after = result.after.capture.logits.double().log_softmax(-1)
    assert result.kl_divergence() == pytest.approx(float(np.sum(np.exp(before.numpy()) * (before - after).numpy())))
    top = int(result.before.capture.logits.argmax())
    assert result.top_logit_change() == pytest.approx(float(expected[top] - result.before.capture.logits[top]),
                                                      abs=1e-6)
    changes = {change.layer: change for change in result.layers()}
    assert list(changes)[0] == 'act1' and changes['act1'].after.dead == changes['act1'].before.dead + 2


def test_mean_mode_equals_a_model_whose_weights_make_the_channel_its_mean(photo):
    loaded = _resnet_with_dead_stem_channels(dead=())
    outputs = {}
    handle = loaded.model.act1.register_forward_hook(lambda m, i, o: outputs.setdefault('act1', o.clone()))
    with torch.no_grad():
        x = preprocess(photo, loaded.data_config)
        loaded.model(x)
    handle.remove()
    means = outputs['act1'][0, [4, 11]].double().numpy().mean(axis=(1, 2))  # numpy, float64
    result = ablate(loaded, photo, 'act1', '4,11', 'mean')
    reference = copy.deepcopy(loaded.model)
    with torch.no_grad():
        reference.bn1.weight[[4, 11]] = 0.0
        reference.bn1.bias[[4, 11]] = torch.tensor(means, dtype=torch.float32)  # constant, positive: kept by ReLU
        expected = reference(x)[0]
    assert torch.allclose(result.after.capture.logits, expected, rtol=1e-5, atol=1e-5)


def test_notebook_procedure_and_token_labeling_head_are_ablated_too(photo):
    loaded = _resnet_with_dead_stem_channels(dead=())
    result = ablate(loaded, photo, 'conv2', 'top:3', procedure=PAPER_NOTEBOOK)
    assert not result.has_logits and not result.unchanged()
    assert result.layers()[0].after.dead >= 3 and result.predictions() == []
    torch.manual_seed(0)
    t2t = timm.create_model('t2t_vit_7', token_label_head=True).eval()
    assert t2t.aux_head is not None
    tl = ablate(_loaded(t2t, 't2t_vit_7'), photo, 'block 4', 'top:5')
    assert not tl.unchanged() and tl.kl_divergence() > 0
    nothing = ablate(_loaded(t2t, 't2t_vit_7'), photo, 'block 4', 'dead')  # a residual stream has none
    assert nothing.channels == [] and nothing.unchanged()


def test_two_threads_ablating_different_channels_each_get_their_own_result(photo):
    loaded = _resnet_with_dead_stem_channels(dead=())
    alone = {spec: ablate(loaded, photo, 'conv3', spec).after.capture.logits for spec in ('1,2', '30,31,32')}
    barrier, results = threading.Barrier(2), {}

    def work(spec):
        barrier.wait()
        for _ in range(3):
            results.setdefault(spec, []).append(ablate(loaded, photo, 'conv3', spec).after.capture.logits)

    threads = [threading.Thread(target=work, args=(spec,)) for spec in alone]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not torch.equal(alone['1,2'], alone['30,31,32'])
    for spec, found in results.items():
        assert all(torch.equal(logits, alone[spec]) for logits in found)
    assert _hooks_left(loaded.model) == 0


def test_channel_choices_and_their_errors():
    loaded = _resnet_with_dead_stem_channels()
    before = ablate(loaded, Image.fromarray(data.astronaut()), 'conv1', 'dead').before
    summary = before.summaries[0]
    assert choose_channels(summary, 'dead') == [3, 7]
    means = summary.stats.mean.numpy()
    assert choose_channels(summary, 'top:3') == sorted(np.argsort(-means, kind='stable')[:3].tolist())
    assert choose_channels(summary, ' 9, 2,2 ') == [2, 9]
    assert choose_channels(summary, 'flat') == summary.flat_ids
    with pytest.raises(ValueError, match='channels 0-63'):
        choose_channels(summary, '64')
    with pytest.raises(ValueError, match='top:0'):
        choose_channels(summary, 'top:0')
    with pytest.raises(ValueError, match='one of dead, flat, massive'):
        choose_channels(summary, 'some')


def test_cli_writes_layer_and_prediction_rows_and_says_no_change(tmp_path, photo, monkeypatch, capsys):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(checkpoints))
    torch.save(_resnet_with_dead_stem_channels().model.state_dict(), checkpoints / 'resnet18.pth')
    photo.save(tmp_path / 'coffee.png')
    out = io.StringIO()
    assert main(['ablate', str(tmp_path / 'coffee.png'), '--model', 'resnet18', '--layer', 'conv1', '--channels',
                 'dead', '-o', str(tmp_path / 'a.csv')], out=out) == 0
    text = out.getvalue()
    assert '2 channel(s) of conv1 (act1) set to zero: 3;7' in text and 'no change' in text
    assert 'top-5 before: ' in text and 'top-5 after: ' in text
    rows = list(csv.DictReader(io.StringIO((tmp_path / 'a.csv').read_text())))
    assert list(rows[0]) == list(ABLATION_COLUMNS)
    layers = [r for r in rows if r['row'] == 'layer']
    assert layers[0]['layer'] == 'act1' and layers[0]['dead_before'] == layers[0]['dead_after'] == '2'
    assert len(layers) == 1 + 16 + 4  # act1, sixteen block ReLUs and four stage outputs of resnet18
    predictions = [r for r in rows if r['row'] == 'prediction']
    assert len(predictions) == 5 and all(r['logit_before'] == r['logit_after'] for r in predictions)
    (summary,) = [r for r in rows if r['row'] == 'summary']
    assert summary['kl_divergence'] == '0' and summary['class'] == predictions[0]['class']
    assert main(['ablate', str(tmp_path / 'coffee.png'), '--model', 'resnet18', '--layer', 'nope', '--channels',
                 'dead', '-o', str(tmp_path / 'b.csv')]) == 2
    assert 'has no layer' in capsys.readouterr().err


def test_rows_name_the_ablation_and_list_every_later_layer(photo):
    loaded = _resnet_with_dead_stem_channels(dead=())
    result = ablate(loaded, photo, 'layer3', 'top:2')
    rows = ablation_rows(result)
    layers = [r for r in rows if r['row'] == 'layer']
    assert [r['layer'] for r in layers] == [layer.name for layer in result.before.capture.layers
                                            if layer.depth >= result.layers()[0].depth]
    assert {r['ablated_channels'] for r in rows} == {';'.join(map(str, result.channels))}
