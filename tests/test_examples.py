"""Top dataset examples per channel: exact against a pass that keeps every map, independent of image order
and (up to float rounding) of batch size, mergeable, and the same file from the CLI and the app."""
import csv
import io
import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.data import resolve_data_config

from t2t_viz import zoo
from t2t_viz.capture import run as capture_run
from t2t_viz.cli import main
from t2t_viz.dataset import NamedImage, StatsRun
from t2t_viz.examples import TOP_EXAMPLE_COLUMNS, ChannelExamples, TopExamples, selective_channels
from t2t_viz.images import preprocess_batch
from t2t_viz.stats import csv_text, max_positions

PHOTOS = ('chelsea', 'coffee', 'astronaut', 'rocket', 'camera', 'hubble_deep_field')


def _images(count: int):
    """``count`` distinct real photographs (rotated and cropped variants of skimage's), named x00.png, ..."""
    images = []
    for i in range(count):
        photo = getattr(data, PHOTOS[i % len(PHOTOS)])()
        image = Image.fromarray(photo).convert('RGB').rotate(17 * (i // len(PHOTOS)))
        images.append(NamedImage(f'x{i:02d}.png', image))
    return images


def _loaded(name: str, seed: int = 0) -> zoo.LoadedModel:
    torch.manual_seed(seed)
    model = timm.create_model(name).eval()
    return zoo.LoadedModel(name, model, zoo.WeightsInfo('random', False), resolve_data_config(model=model))


def _stream(models, images, batch: int, k: int = 3) -> StatsRun:
    run = StatsRun(models, io.StringIO(), top_k=k)
    for start in range(0, len(images), batch):
        run.add_batch(images[start:start + batch])
    return run


def _brute_force(loaded: zoo.LoadedModel, images, k: int):
    """Every full map of every image kept; per layer and channel, numpy ranks (max desc, name asc)."""
    per_layer = {}
    for item in images:
        x = preprocess_batch([item.image], loaded.data_config)
        layers = capture_run(loaded.model, x)[0].layers
        for layer in layers:
            values = layer.fmap.numpy().reshape(layer.channels, -1)  # (C, H*W) float32
            maxima, where = values.max(axis=1), values.argmax(axis=1)
            per_layer.setdefault(layer.name, (layer.width, []))[1].append((item.name, maxima, where))
    rows = []
    for name, (width, seen) in per_layer.items():
        for channel in range(len(seen[0][1])):
            ranked = sorted(((-float(m[channel]), image, int(w[channel])) for image, m, w in seen))[:k]
            for rank, (value, image, position) in enumerate(ranked, start=1):
                rows.append((name, channel, rank, image, -value, position // width, position % width))
    return rows


def _rows(run: StatsRun):
    return [(r['layer'], r['channel'], r['rank'], r['image'], float(r['value']), r['row'], r['col'])
            for r in run.examples.rows()]


@pytest.mark.parametrize('name', ['resnet18', 't2t_vit_7'])
def test_top_examples_equal_a_pass_that_keeps_every_map(name):
    loaded = _loaded(name)
    images = _images(7)
    run = _stream({name: loaded}, images, batch=1, k=3)
    expected = _brute_force(loaded, images, 3)
    found = [(layer, channel, rank, example.image, example.value, example.row, example.col)
             for layer, kept in run.examples.layers(name) for channel in range(kept.channels)
             for rank, example in enumerate(kept.examples(channel), start=1)]
    assert found == expected  # float32 values, bit for bit


def test_the_same_files_in_any_order_give_the_same_file_byte_for_byte():
    models = {'resnet18': _loaded('resnet18'), 't2t_vit_7': _loaded('t2t_vit_7')}
    images = _images(8)
    shuffled = images[:]
    random.Random(3).shuffle(shuffled)
    first = _stream(models, images, batch=1).top_examples_csv()
    again = _stream(models, shuffled, batch=1).top_examples_csv()
    assert first == again
    assert first.splitlines()[0] == ','.join(TOP_EXAMPLE_COLUMNS)


def test_another_batch_size_moves_values_by_rounding_only():
    models = {'t2t_vit_7': _loaded('t2t_vit_7')}
    images = _images(8)
    one, four = _rows(_stream(models, images, batch=1)), _rows(_stream(models, images, batch=4))
    assert len(one) == len(four)
    by_key = {}
    for rows in (one, four):
        for layer, channel, rank, image, value, row, col in rows:
            by_key.setdefault((layer, channel, rank), []).append((image, value, row, col))
    for (layer, channel, rank), ((image1, value1, *where1), (image4, value4, *where4)) in by_key.items():
        assert value4 == pytest.approx(value1, rel=1e-5, abs=1e-6)
        if image1 != image4:  # a swap is allowed only between examples whose values are that close
            close = [v for key, pairs in by_key.items() if key[:2] == (layer, channel)
                     for image, v, *_ in pairs if image in (image1, image4)]
            assert max(close) - min(close) <= 1e-5 * max(abs(v) for v in close) + 1e-6


def _planted(values, images, positions, k=3):
    layer = ChannelExamples('conv1', 'relu', 0, len(values[0]), 4, 4, k)
    for image, v, p in zip(images, values, positions):
        layer.add(image, np.asarray(v, dtype=np.float32), np.asarray(p))
    return layer


def test_ties_are_broken_by_image_name_and_lists_keep_the_k_largest():
    values = [[1.0, 5.0], [3.0, 5.0], [2.0, 5.0], [3.0, 4.0], [0.5, 6.0]]
    names = ['e', 'd', 'c', 'b', 'a']
    positions = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    layer = _planted(values, names, positions)
    assert [(e.image, e.value) for e in layer.examples(0)] == [('b', 3.0), ('d', 3.0), ('c', 2.0)]
    assert [(e.image, e.value, e.row, e.col) for e in layer.examples(1)] == [
        ('a', 6.0, 2, 1), ('c', 5.0, 1, 1), ('d', 5.0, 0, 3)]
    assert layer.mean_maximum().tolist() == pytest.approx([9.5 / 5, 25.0 / 5])
    assert layer.floor().tolist() == [2.0, 5.0]
    for order in ([4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        other = _planted([values[i] for i in order], [names[i] for i in order], [positions[i] for i in order])
        assert np.array_equal(other.values, layer.values) and (other.images == layer.images).all()
        assert np.array_equal(other.positions, layer.positions)


def test_a_merge_of_two_halves_equals_one_stream():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 6, size=(40, 5)).astype(np.float32)  # many ties
    names = [f'img{i:02d}' for i in range(40)]
    positions = rng.integers(0, 16, size=(40, 5))
    whole = _planted(values, names, positions, k=4)
    left, right = _planted(values[:17], names[:17], positions[:17], 4), _planted(values[17:], names[17:],
                                                                                  positions[17:], 4)
    right.merge(left)
    assert np.array_equal(right.values, whole.values) and (right.images == whole.images).all()
    assert np.array_equal(right.positions, whole.positions)
    assert right.image_count == 40 and right.maximum_sum == pytest.approx(whole.maximum_sum)


def test_an_entering_maximum_that_was_not_located_is_an_error_not_a_wrong_position():
    layer = _planted([[1.0], [2.0], [3.0]], ['a', 'b', 'c'], [[0], [1], [2]])
    layer.add('d', np.array([0.5], dtype=np.float32), np.array([-1]))  # below the floor: fine unlocated
    with pytest.raises(ValueError, match='not located'):
        layer.add('e', np.array([9.0], dtype=np.float32), np.array([-1]))


def test_maxima_are_located_only_where_they_reach_the_floor_at_1024():
    torch.manual_seed(0)
    values = torch.rand(1024, 64 * 64)  # ViT-L/16 at 1024: 1024 channels x 64 x 64 tokens
    planted = torch.randint(0, 64 * 64, (1024,))
    values[torch.arange(1024), planted] = 2.0 + torch.arange(1024) / 1024
    floor = torch.full((1024,), 2.75)
    located = max_positions(values, values.amax(dim=1), floor)
    reaching = values.amax(dim=1) >= 2.75
    assert torch.equal(located[reaching], planted[reaching]) and reaching.sum() == 256
    assert (located[~reaching] == -1).all()
    half = max_positions(values, values.amax(dim=1), torch.full((1024,), 2.5))  # half reach it: one argmax
    assert torch.equal(half, planted)
    everything = max_positions(values, values.amax(dim=1), torch.tensor(-float('inf')))
    assert torch.equal(everything, planted)


def test_selective_channels_rank_the_gap_between_the_top_example_and_the_mean():
    layer = _planted([[1.0, 1.0, 0.0], [1.0, 9.0, 0.0], [1.0, 1.0, 0.0]], ['a', 'b', 'c'],
                     [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    table = selective_channels(layer)
    assert [row['channel'] for row in table] == [1, 0, 2]
    assert table[0]['gap'] == pytest.approx(9.0 - 11.0 / 3) and table[0]['top image'] == 'b'


def test_cli_top_examples_equal_the_apps_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(checkpoints))
    torch.save(_loaded('resnet18').model.state_dict(), checkpoints / 'resnet18.pth')
    images = _images(5)
    for item in images:
        item.image.resize((120, 90)).save(tmp_path / item.name)
    monkeypatch.chdir(tmp_path)
    names = [item.name for item in images]
    assert main(['stats', *names, '--model', 'resnet18', '-o', 'cli.csv', '--top-examples', 'top.csv',
                 '--top-k', '2', '--batch-size', '2']) == 0
    from t2t_viz.dataset import expand_uploads
    run = StatsRun({'resnet18': zoo.load('resnet18', device='cpu')}, io.StringIO(), top_k=2)
    items = list(expand_uploads((name, (tmp_path / name).read_bytes()) for name in names))
    for start in range(0, len(items), 2):
        run.add_batch(items[start:start + 2])
    text = (tmp_path / 'top.csv').read_text()
    assert run.top_examples_csv() == text
    per_image = list(csv.DictReader(io.StringIO((tmp_path / 'cli.csv').read_text())))
    channels = sum(int(row['channels']) for row in per_image if row['image'] == 'x00.png')
    rows = text.splitlines()
    assert len(rows) == 1 + 2 * channels  # every channel of every layer keeps 2 of the 5 images
    assert rows[1].startswith('resnet18,trained,real_forward,act1,0,1,x0')


def test_the_csv_text_is_the_rows_written_by_the_csv_module_even_for_awkward_names():
    examples = TopExamples(k=2)
    layer = ChannelExamples('block 1', 'block', 0, channels=3, height=2, width=5, k=2)
    seen = (('a,b.png', [1.0, 2.0, -1.0]), ('say "hi".png', [3.0, 0.5, 7.25]), ('z.png', [0.1, 2.0, 7.25]))
    for image, maxima in seen:
        layer.add(image, np.array(maxima, np.float32), np.array([3, 9, 4]))
    examples.put(('m', 'random', 'real_forward', 'blocks.0'), layer)
    text = examples.csv_text()
    assert text == csv_text(examples.rows(), TOP_EXAMPLE_COLUMNS)
    assert text.splitlines()[1:4] == ['m,random,real_forward,blocks.0,0,1,"say ""hi"".png",3,0,3',
                                      'm,random,real_forward,blocks.0,0,2,"a,b.png",1,0,3',
                                      'm,random,real_forward,blocks.0,1,1,"a,b.png",2,1,4']
