"""Statistics over many images: uploads and zips, streaming aggregates, the same CSV as the CLI."""
import gc
import io
import math
import os
import warnings
import zipfile

import pytest
import timm
import torch
from timm.data import resolve_data_config

from t2t_viz import zoo
from t2t_viz.capture import Layer
from t2t_viz.cli import main
from t2t_viz.dataset import Failure, NamedImage, StatsRun, depth_bands, expand_uploads
from t2t_viz.kernels import FusedReduction
from t2t_viz.stats import DeadChannelCounter, summarize


def _png(image, size=(96, 80)) -> bytes:
    buffer = io.BytesIO()
    image.resize(size).save(buffer, format='PNG')
    return buffer.getvalue()


def _loaded(name):
    model = timm.create_model(name).eval()
    return zoo.LoadedModel(name, model, zoo.WeightsInfo('random', False), resolve_data_config(model=model))


def test_uploads_zip_members_and_bad_files_are_named(chelsea):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('set/a.png', _png(chelsea))
        z.writestr('set/notes.txt', 'not an image, skipped')
        z.writestr('__MACOSX/set/._a.png', b'metadata')
        z.writestr('set/broken.jpg', b'\xff\xd8 broken')
    items = list(expand_uploads([('one.png', _png(chelsea)), ('photos.zip', archive.getvalue()),
                                 ('bad.png', b'nope'), ('fake.zip', b'not a zip')]))
    images = [i.name for i in items if isinstance(i, NamedImage)]
    failures = {i.name: i.reason for i in items if isinstance(i, Failure)}
    assert images == ['one.png', 'photos.zip/set/a.png']
    assert failures['bad.png'] == 'not an image Pillow can read'
    assert 'corrupt' in failures['photos.zip/set/broken.jpg'] or 'not an image' in failures['photos.zip/set/broken.jpg']
    assert 'not a readable zip file' in failures['fake.zip']


def test_csv_equals_the_cli_byte_for_byte(tmp_path, chelsea, monkeypatch):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(checkpoints))
    for name in ('resnet18', 't2t_vit_7'):  # the same weights for the CLI and the app
        torch.save(timm.create_model(name).state_dict(), checkpoints / f'{name}.pth')
    names = ['a.png', 'b.png', 'c.png']
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(_png(chelsea.rotate(30 * i)))
    monkeypatch.chdir(tmp_path)
    assert main(['stats', *names, '--model', 'resnet18', '--model', 't2t_vit_7', '-o', 'cli.csv',
                 '--per-channel', 'cli_channels.csv', '--batch-size', '2']) == 0
    models = {name: zoo.load(name, device='cpu') for name in ('resnet18', 't2t_vit_7')}
    out = io.StringIO()
    run = StatsRun(models, out)
    items = list(expand_uploads((name, (tmp_path / name).read_bytes()) for name in names))
    for start in range(0, len(items), 2):
        run.add_batch(items[start:start + 2])
    assert out.getvalue() == (tmp_path / 'cli.csv').read_text()
    assert ',trained,' in out.getvalue()
    assert run.per_channel_csv() == (tmp_path / 'cli_channels.csv').read_text()


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage reachable from Python, and of the arrays of every fused reduction (the
    statistics, which become tensors only when read), after collecting garbage (tracemalloc never sees tensor
    storage: PyTorch allocates it outside Python's allocator)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # isinstance on torch.distributed's deprecated aliases
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            elif isinstance(obj, FusedReduction):
                for array in (obj.floats, obj.ints, obj.flags):
                    storages[array.ctypes.data] = array.nbytes
    return sum(storages.values())


def test_live_tensor_bytes_sees_kept_maps():
    before = _live_tensor_bytes()
    kept = [torch.ones(4, 1024, 1024) for _ in range(4)]  # 64 MiB
    assert _live_tensor_bytes() - before == 64 * 2**20
    del kept


def test_memory_does_not_grow_with_the_number_of_images(chelsea, monkeypatch):
    models = {'t2t_vit_7': _loaded('t2t_vit_7')}
    run = StatsRun(models, open(os.devnull, 'w'))
    batch = [NamedImage(f'{i}.png', chelsea.resize((64, 64))) for i in range(2)]
    run.add_batch(batch)  # warm up: aggregates and counters for every layer now exist
    after_one = _live_tensor_bytes()
    for _ in range(6):
        run.add_batch(batch)
    assert run.images_done == 14
    assert _live_tensor_bytes() - after_one == 0  # no maps, no statistics tensors, nothing per image
    bands = depth_bands(run.aggregates.values())
    assert len(bands) == 1 and len(bands[0].labels) == 7  # the blocks of t2t_vit_7
    band = bands[0]
    assert (band.low['dead_fraction'] <= band.mean['dead_fraction']).all()
    assert (band.mean['dead_fraction'] <= band.high['dead_fraction']).all()
    layers = run.counter.layers('t2t_vit_7')
    assert len(layers) == 13 and layers[0][1].images == 14

    kept = []  # the measurement catches a run that keeps what it should drop
    monkeypatch.setattr(run, '_add', lambda item, result, out: kept.append(result))
    run.add_batch(batch)
    assert _live_tensor_bytes() - after_one > 100_000


@pytest.mark.parametrize('procedures', [('real_forward', 'paper_notebook')])
def test_both_procedures_are_counted_apart(chelsea, procedures):
    out = io.StringIO()
    run = StatsRun({'resnet18': _loaded('resnet18')}, out, procedures=procedures)
    run.add_batch([NamedImage('cat.png', chelsea.resize((64, 64)))])
    channel_rows = run.per_channel_csv().splitlines()
    assert channel_rows[0].endswith(',procedure')
    assert {line.rsplit(',', 1)[1] for line in channel_rows[1:]} == set(procedures)
    assert len(run.counter.layers('resnet18', 'paper_notebook')) == 17


def test_dead_frequency_matrix_pads_narrow_layers_and_orders_by_depth():
    def summary(name: str, depth: int, dead: list, channels: int):
        fmap = torch.ones(channels, 2, 2)
        fmap[dead] = 0
        return summarize(Layer(name, 'block', depth, fmap, f'block {depth + 1}'))

    counter = DeadChannelCounter()
    for dead_in_wide in ([1, 3], [1]):  # added deepest layer first: the matrix is in depth order
        counter.add('m', 'random', summary('b', 1, dead_in_wide, 4))
        counter.add('m', 'random', summary('a', 0, [0], 2))
    expected = torch.tensor([[1.0, 0.0, math.nan, math.nan], [0.0, 1.0, 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(counter.frequency_matrix('m'), expected, equal_nan=True)


def test_a_batch_is_run_only_beside_what_resizing_its_largest_photo_needs(monkeypatch):
    from PIL import Image
    from t2t_viz import memory
    from t2t_viz.images import preprocess_bytes
    from t2t_viz.pipeline import memory_estimate
    loaded = _loaded('resnet18')
    photo = Image.new('RGB', (4000, 3000), (90, 120, 30))  # 12 MP
    resizing = preprocess_bytes(photo, loaded.data_config)
    one = memory_estimate('resnet18', 224, 1, keep_maps=False).peak
    two = memory_estimate('resnet18', 224, 2, keep_maps=False).peak
    run = StatsRun({'resnet18': loaded}, io.StringIO())
    images = [NamedImage('big.png', photo), NamedImage('small.png', photo.resize((64, 48)))]
    passes = []
    monkeypatch.setattr('t2t_viz.dataset.inspect_images', lambda loaded, chunk, *a, **k: passes.append(len(chunk))
                        or [])
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: resizing + (one + two) // 2)
    run.add_batch(images, {('resnet18', 'real_forward'): 2})
    assert passes == [1, 1]  # two images would fit without the photo's resize, not beside it
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: resizing + one - 1)
    with pytest.raises(memory.InsufficientMemory, match='for one image'):
        run.add_batch(images, {('resnet18', 'real_forward'): 2})


def test_on_a_gpu_passes_fit_its_memory_and_resizing_fits_the_hosts(monkeypatch):
    from PIL import Image
    from t2t_viz import memory
    from t2t_viz.images import preprocess_bytes
    from t2t_viz.pipeline import memory_estimate
    loaded = _loaded('resnet18')
    loaded.device = torch.device('cuda')  # only asked where it runs: nothing runs here
    photo = Image.new('RGB', (4000, 3000))
    resizing = preprocess_bytes(photo, loaded.data_config)
    one = memory_estimate('resnet18', 224, 1, keep_maps=False).peak
    free = {'cuda': one + 10, 'cpu': resizing + 10}
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: free[torch.device(device or 'cpu').type])
    passes = []
    monkeypatch.setattr('t2t_viz.dataset.inspect_images', lambda loaded, chunk, *a, **k: passes.append(len(chunk))
                        or [])
    run = StatsRun({'resnet18': loaded}, io.StringIO())
    images = [NamedImage('big.png', photo), NamedImage('b.png', photo)]
    run.add_batch(images, {('resnet18', 'real_forward'): 2})
    assert passes == [1, 1]  # the GPU holds one pass; the host holds the resize
    free['cpu'] = resizing - 1
    with pytest.raises(memory.InsufficientMemory, match='resizing big.png needs about'):
        run.add_batch(images, {('resnet18', 'real_forward'): 2})


def test_dead_channel_counts_per_procedure_in_depth_order_and_their_rows():
    def summary(name: str, label: str, kind: str, depth: int, dead: list, channels: int):
        fmap = torch.ones(channels, 2, 2)
        fmap[dead] = 0
        return summarize(Layer(name, kind, depth, fmap, label))

    counter = DeadChannelCounter()
    counter.add('m', 'trained', summary('z.deep', 'block 2', 'block', 1, [0], 2), 'real_forward')
    counter.add('m', 'trained', summary('a.late', 'block 9', 'block', 9, [], 1), 'real_forward')
    counter.add('m', 'trained', summary('z.deep', 'block 2', 'block', 1, [0, 1], 2), 'real_forward')
    counter.add('m', 'trained', summary('z.deep', 'block 2', 'block', 1, [1], 2), 'paper_notebook')
    layers = counter.layers('m')
    assert [(name, c.label, c.kind, c.depth, c.images) for name, c in layers] == [
        ('z.deep', 'block 2', 'block', 1, 2), ('a.late', 'block 9', 'block', 9, 1)]  # by depth, not by name
    torch.testing.assert_close(counter.frequency_matrix('m'), torch.tensor([[1.0, 0.5], [0.0, math.nan]],
                                                                            dtype=torch.float64), equal_nan=True)
    assert counter.frequency_matrix('m', 'paper_notebook').tolist() == [[0.0, 1.0]]
    assert counter.frequency_matrix('other').shape == (0, 0)
    rows = list(counter.rows())
    assert rows[:2] == [
        {'model': 'm', 'weights': 'trained', 'layer': 'z.deep', 'kind': 'block', 'depth': 1, 'channel': 0,
         'images': 2, 'dead_images': 2, 'dead_fraction': '1', 'procedure': 'real_forward'},
        {'model': 'm', 'weights': 'trained', 'layer': 'z.deep', 'kind': 'block', 'depth': 1, 'channel': 1,
         'images': 2, 'dead_images': 1, 'dead_fraction': '0.5', 'procedure': 'real_forward'}]
    assert all(type(row['dead_images']) is int for row in rows)


def test_job_files_stay_on_disk_and_give_back_each_image_by_its_name(chelsea):
    from PIL import ImageChops

    from t2t_viz.dataset import JobFiles
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, 'w') as z:
        z.writestr('set/a.png', _png(chelsea.rotate(90)))
        z.writestr('set/b.png', _png(chelsea.rotate(180)))
    files = JobFiles([('one.png', _png(chelsea)), ('photos.zip', archive.getvalue())])
    folder = files._folder.name
    assert files.disk_bytes == len(_png(chelsea)) + len(archive.getvalue())
    names = [item.name for item in expand_uploads(files.sources())]
    assert names == ['one.png', 'photos.zip/set/a.png', 'photos.zip/set/b.png']
    expected = {item.name: item.image for item in expand_uploads([('one.png', _png(chelsea)),
                                                                  ('photos.zip', archive.getvalue())])}
    for name in names:
        assert ImageChops.difference(files.image(name), expected[name]).getbbox() is None, name
    with pytest.raises(KeyError, match='no file'):
        files.image('two.png')
    files.close()
    assert not os.path.exists(folder)
