"""Inspection engine: capture, flags, CSV, zoo resolution, images and the CLI."""
import csv
import io
import platform
import subprocess
import sys
import threading

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from t2t_viz import capture, zoo
from t2t_viz.cli import main
from t2t_viz.images import SAMPLE_PHOTOS, ImageError, load_image, preprocess, sample_photo
from t2t_viz.pipeline import inspect_images
from t2t_viz.render import channel_grid, normalize_channels, side_by_side
from t2t_viz.stats import CSV_COLUMNS, Thresholds, summarize


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')


def _dead_and_massive_resnet():
    """resnet18 where channel 5 of every main-path ReLU is exactly zero and stem channel 7 is huge."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18').eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.BatchNorm2d) and not name.endswith('downsample.1'):
                module.weight[5] = 0
                module.bias[5] = -1.0  # after ReLU: exactly zero
            if name.endswith('downsample.1'):
                module.weight[5] = 0
                module.bias[5] = -1.0
        model.bn1.bias[7] = 1e5
    return model


def _dead_vit(name: str):
    """A token model in which embedding channel 3 is exactly zero in every block output."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.no_grad():
        embed = model.tokens_to_token.project if hasattr(model, 'tokens_to_token') else model.patch_embed.proj
        embed.weight[3] = 0
        embed.bias[3] = 0
        if hasattr(model, 'pos_embed'):
            model.pos_embed[..., 3] = 0
        model.cls_token[..., 3] = 0
        for block in model.blocks:
            block.attn.proj.weight[3] = 0
            block.attn.proj.bias[3] = 0
            block.mlp.fc2.weight[3] = 0
            block.mlp.fc2.bias[3] = 0
    return model


def _loaded(name, model, trained=False):
    from timm.data import resolve_data_config
    info = zoo.WeightsInfo('file' if trained else 'random', trained, 'test')
    return zoo.LoadedModel(name, model, info, resolve_data_config(model=model))


def test_resnet_flags_counts_ids_and_csv(chelsea):
    result = inspect_images(_loaded('resnet18', _dead_and_massive_resnet()), [chelsea])[0]
    layers = result.capture.layers
    relus = [s for s in result.summaries if s.kind in ('stem', 'relu')]
    assert len(relus) == 17 and [s.label for s in relus[:3]] == ['conv1', 'conv2', 'conv3']
    assert [s.name for s in result.summaries if s.kind == 'stage'] == ['layer1', 'layer2', 'layer3', 'layer4']
    for summary in relus:
        assert 5 in summary.dead_ids, summary.name
    stem = result.summaries[0]
    assert stem.name == 'act1' and stem.massive_ids == [7] and stem.dead_ids == [5]
    assert layers[0].fmap.shape == (64, 112, 112)
    rows = list(csv.DictReader(io.StringIO(_csv(result.rows('chelsea.png')))))
    assert list(rows[0])[:16] == list(CSV_COLUMNS[:16])
    assert rows[0]['dead'] == '1' and rows[0]['dead_ids'] == '5' and rows[0]['massive_ids'] == '7'
    assert rows[0]['weights'] == 'random' and rows[0]['depth'] == '0' and rows[0]['tokens'] == str(112 * 112)
    assert float(rows[0]['dead_fraction']) == pytest.approx(1 / 64)


def _csv(rows):
    from t2t_viz.stats import csv_text
    return csv_text(rows)


@pytest.mark.parametrize('name,grid', [('vit_tiny_patch16_224', (14, 14)), ('t2t_vit_7', (14, 14))])
def test_token_models_dead_channel_in_every_block(chelsea, name, grid):
    result = inspect_images(_loaded(name, _dead_vit(name)), [chelsea], mlp_hidden=True)[0]
    blocks = [s for s in result.summaries if s.kind == 'block']
    assert len(blocks) == len(timm.create_model(name).blocks)
    for summary in blocks:
        assert summary.dead_ids == [3], summary.name
        assert (summary.height, summary.width) == grid  # class token removed, real grid
    assert any(s.kind == 'mlp_hidden' for s in result.summaries)
    if name.startswith('t2t'):
        stages = [(s.kind, s.channels, s.height) for s in result.summaries[:6]]
        assert stages == [('soft_split', 147, 56), ('restructurization', 64, 56), ('soft_split', 576, 28),
                          ('restructurization', 64, 28), ('soft_split', 576, 14), ('projection', 256, 14)]


def test_flat_and_thresholds():
    fmap = torch.randn(4, 8, 8)
    fmap[1] = 0
    fmap[2] = 3.5
    fmap[3] = 1e-7
    layer = capture.Layer('x', 'block', 0, fmap)
    summary = summarize(layer)
    assert summary.dead_ids == [1, 3] and summary.flat_ids == [2]
    assert summarize(layer, Thresholds(dead_atol=1e-9)).dead_ids == [1]


def test_block_maps_match_forward_intermediates():
    model = timm.create_model('vit_tiny_patch16_224').eval()
    x = torch.randn(1, 3, 224, 224)
    cap = capture.run(model, x)[0]
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
    blocks = [layer for layer in cap.layers if layer.kind == 'block']
    torch.testing.assert_close(blocks[5].fmap, inter[5][0])


@pytest.mark.parametrize('name', ['resnet18', 'resnet26'])  # BasicBlock, Bottleneck
def test_resnet_maps_kept_without_copy_equal_fresh_clones(name, cloned_outputs):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 160, 160)
    layers = capture.run(model, x)[0].layers
    expected = cloned_outputs(model, x, [layer.name for layer in layers])
    for layer in layers:
        torch.testing.assert_close(layer.fmap, expected[layer.name][0], rtol=0, atol=0, msg=layer.name)


def test_resnet_with_unknown_blocks_is_copied_before_later_in_place_writes(cloned_outputs):
    from timm.models.resnet import BasicBlock

    class DoublingBlock(BasicBlock):
        def forward(self, x):
            return super().forward(x).mul_(2)  # writes into act2's output after its hook has run

    torch.manual_seed(0)
    model = timm.create_model('resnet18', block=DoublingBlock).eval()
    x = torch.randn(1, 3, 128, 128)
    layers = capture.run(model, x)[0].layers
    expected = cloned_outputs(model, x, [layer.name for layer in layers])
    act = next(layer for layer in layers if layer.name == 'layer1.0.act2')
    torch.testing.assert_close(act.fmap, expected['layer1.0.act2'][0], rtol=0, atol=0)


def test_hooks_removed_even_when_forward_raises():
    model = timm.create_model('t2t_vit_7').eval()
    with pytest.raises(ValueError):
        capture.run(model, torch.randn(1, 3, 256, 256))  # wrong size for this model
    assert all(not m._forward_hooks for m in model.modules())
    capture.run(model, torch.randn(1, 3, 224, 224))
    assert all(not m._forward_hooks for m in model.modules())


def test_concurrent_captures_on_one_model_stay_separate():
    model = timm.create_model('resnet18').eval()
    inputs = [torch.full((1, 3, 64, 64), float(i)) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results, errors = {}, []
    barrier = threading.Barrier(len(inputs))

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                cap = capture.run(model, inputs[i])[0]
                assert len(cap.layers) == 17 + 4
                results[i] = cap
        except Exception as e:  # reported below with the thread's index
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, cap in results.items():
        torch.testing.assert_close(cap.logits, expected[i][0])
        solo = capture.run(model, inputs[i])[0]
        for a, b in zip(cap.layers, solo.layers):
            assert a.name == b.name and torch.equal(a.fmap, b.fmap)


def test_float16_and_downsampled_storage():
    model = timm.create_model('t2t_vit_7').eval()
    cap = capture.run(model, torch.randn(1, 3, 224, 224), dtype=torch.float16, max_side=28)[0]
    assert all(layer.fmap.dtype == torch.float16 for layer in cap.layers)
    assert max(layer.fmap.shape[1] for layer in cap.layers) == 28
    first = cap.layers[0]
    assert first.shape == (147, 56, 56) and first.pooled and (first.height, first.width) == (56, 56)


def test_side_by_side_top_aligns_on_white_with_gaps():
    tall, short = np.zeros((4, 3, 3), np.uint8), np.full((2, 2, 3), 7, np.uint8)
    row = side_by_side([tall, short], gap=1)
    assert row.shape == (4, 3 + 1 + 2 + 1, 3)
    assert (row[:2, 4:6] == 7).all() and (row[2:, 4:6] == 255).all() and (row[:, 3] == 255).all()


def test_render_grid_marks_dead_and_survives_constant_channels():
    fmap = torch.randn(6, 10, 10)
    fmap[2] = 0
    summary = summarize(capture.Layer('x', 'block', 0, fmap))
    unit = normalize_channels(fmap)
    assert np.isfinite(unit).all() and unit[2].max() == 0
    grid = channel_grid(fmap, summary, cell=20, columns=3)
    assert grid.shape == (2 * 26, 3 * 26, 3)
    assert tuple(grid[1, 2 * 26 + 1]) == (230, 25, 25)  # third tile's frame is red


def _write(path, image, **kwargs):
    image.save(path, **kwargs)
    return path


def test_image_modes_and_exif(tmp_path, chelsea):
    rgba = chelsea.convert('RGBA')
    rgba.putalpha(0)
    assert np.asarray(load_image(_write(tmp_path / 'a.png', rgba))).min() == 255  # transparent -> white
    sixteen = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    loaded = np.asarray(load_image(_write(tmp_path / 's.png', sixteen)))
    assert loaded.max() == 255 and loaded.min() == 0  # rescaled, not clipped
    floats = Image.fromarray(np.linspace(-5, 5, 100, dtype=np.float32).reshape(10, 10), 'F')
    assert np.asarray(load_image(_write(tmp_path / 'f.tiff', floats))).max() == 255
    assert load_image(_write(tmp_path / 'c.jpg', chelsea.convert('CMYK'))).mode == 'RGB'
    assert load_image(_write(tmp_path / 'p.gif', chelsea.convert('P'))).mode == 'RGB'
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    rotated = load_image(_write(tmp_path / 'r.jpg', chelsea, exif=exif))
    assert rotated.size == (chelsea.height, chelsea.width)
    assert load_image(_write(tmp_path / 'w.webp', chelsea)).size == chelsea.size
    assert load_image(_write(tmp_path / 'b.bmp', chelsea)).size == chelsea.size


def test_bad_images_fail_with_one_clear_message(tmp_path, chelsea):
    (tmp_path / 'text.png').write_text('not an image')
    good = _write(tmp_path / 'good.jpg', chelsea)
    (tmp_path / 'truncated.jpg').write_bytes(good.read_bytes()[:2000])
    cases = {'text.png': 'not an image', 'truncated.jpg': 'corrupt or truncated', 'missing.png': 'no such file'}
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=f'{name}: {reason}'):
            load_image(tmp_path / name)
    with pytest.raises(ImageError, match='over the limit'):
        load_image(good, max_pixels=1000)
    with pytest.raises(ImageError, match='uploaded image: not an image'):
        load_image(b'\x00\x01garbage')


def test_sample_photos_are_scikit_images_own_pictures():
    """Read as files through load_image, as uploads are: the pixels of skimage.data's loaders."""
    from skimage import data
    for label, loader in zip(SAMPLE_PHOTOS, (data.chelsea, data.coffee, data.astronaut, data.rocket)):
        name, content = sample_photo(label)
        assert name.split('.')[0] == label.split(' ')[0]
        np.testing.assert_array_equal(np.asarray(load_image(content, name=name)), loader())


def test_preprocess_uses_model_config(chelsea):
    vit = zoo.load('vit_tiny_patch16_224', device='cpu')
    assert vit.data_config['mean'] == (0.5, 0.5, 0.5)
    x = preprocess(chelsea, vit.data_config)
    assert x.shape == (1, 3, 224, 224)
    high = zoo.load('t2t_vit_7', img_size=448, device='cpu')
    assert preprocess(chelsea, high.data_config).shape == (1, 3, 448, 448)
    assert high.model.pos_embed.shape == (1, 1 + 28 * 28, 256)


def test_input_size_must_be_a_multiple_of_16():
    with pytest.raises(ImageError, match='multiple of 16'):
        zoo.check_input_size(300)
    zoo.check_input_size(2048)


def test_zoo_file_then_random(tmp_path):
    random = zoo.load('t2t_vit_7', device='cpu', checkpoint_dir=tmp_path)
    assert random.weights.source == 'random' and not random.weights.trained
    assert 'checkpoints/' in random.weights.note
    torch.save({'state_dict_ema': random.model.state_dict()}, tmp_path / '71.7_T2T_ViT_7.pth.tar')
    trained = zoo.load('t2t_vit_7', device='cpu', checkpoint_dir=tmp_path)
    assert trained.weights.source == 'file' and trained.weights.trained
    assert zoo.weights_status('t2t_vit_7', tmp_path).trained
    resnet = timm.create_model('resnet18')
    torch.save(resnet.state_dict(), tmp_path / 'resnet18.pth')
    assert zoo.load('resnet18', device='cpu', checkpoint_dir=tmp_path).weights.label == 'trained'
    (tmp_path / 'resnet34.pth').write_bytes(b'garbage')
    with pytest.raises(zoo.WeightsError, match='resnet34.pth'):
        zoo.load('resnet34', device='cpu', checkpoint_dir=tmp_path)


def test_cuda_device(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip('no CUDA GPU on this machine')
    cpu = zoo.load('t2t_vit_7', device='cpu', checkpoint_dir=tmp_path)
    gpu = zoo.load('t2t_vit_7', device='cuda', checkpoint_dir=tmp_path)
    gpu.model.load_state_dict(cpu.model.state_dict())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(capture.run(gpu.model, x)[0].logits, capture.run(cpu.model, x)[0].logits,
                               atol=1e-3, rtol=1e-3)


def test_cli_stats_end_to_end(tmp_path, chelsea, capsys):
    folder = tmp_path / 'images'
    (folder / 'sub').mkdir(parents=True)
    chelsea.save(folder / 'cat.png')
    chelsea.resize((100, 80)).save(folder / 'sub' / 'small.jpg')
    (folder / 'broken.png').write_text('nope')
    ckpt = tmp_path / 'ckpt.pth.tar'
    torch.save({'state_dict': timm.create_model('t2t_vit_7').state_dict()}, ckpt)
    out, per_channel = tmp_path / 'stats.csv', tmp_path / 'channels.csv'
    code = main(['stats', str(folder), '--model', 'resnet18', '--model', 't2t_vit_7',
                 '--checkpoint', f't2t_vit_7={ckpt}', '--batch-size', '2', '-o', str(out),
                 '--per-channel', str(per_channel)])
    assert code == 1  # one file was skipped, the others are in the CSV
    assert 'broken.png: not an image' in capsys.readouterr().err
    rows = list(csv.DictReader(out.open()))
    assert {r['image'] for r in rows} == {str(folder / 'cat.png'), str(folder / 'sub' / 'small.jpg')}
    assert {(r['model'], r['weights']) for r in rows} == {('resnet18', 'random'), ('t2t_vit_7', 'trained')}
    assert len(rows) == 2 * (21 + 6 + 7)
    channel_rows = list(csv.DictReader(per_channel.open()))
    assert channel_rows[0]['images'] == '2'


def test_cli_stages_render_and_errors(tmp_path, chelsea, capsys):
    image = tmp_path / 'cat.png'
    chelsea.save(image)
    assert main(['stages', str(image), '--model', 't2t_vit_7']) == 0
    assert '56x56 = 3136 -> 28x28 = 784 -> 14x14 = 196' in capsys.readouterr().out
    png = tmp_path / 'grid.png'
    assert main(['render', str(image), '--model', 'resnet18', '--layer', 'conv5', '-o', str(png)]) == 0
    assert Image.open(png).size[0] > 100
    assert main(['render', str(image), '--model', 'resnet18', '--layer', 'nope', '-o', str(png)]) == 2
    assert main(['stages', str(tmp_path / 'missing.png')]) == 2
    assert main(['stats', str(image), '--model', 'no_such_model', '-o', str(tmp_path / 'x.csv')]) == 2
    assert main(['stages', str(image), '--model', 't2t_vit_7', '--img-size', '300']) == 2
    err = capsys.readouterr().err
    assert 'no layer' in err and 'no such file' in err and 'unknown model' in err and 'multiple of 16' in err


_FAULTS_OF_FREED_BLOCKS = r'''
import resource, sys
import numpy as np
from t2t_viz.allocator import batched_mmap_threshold, reuse_freed_memory
assert reuse_freed_memory(batched_mmap_threshold(int(sys.argv[1]))) and reuse_freed_memory(
    batched_mmap_threshold(int(sys.argv[1])))
np.ones(16 * 2 ** 20, np.uint8)  # a 16 MiB block, freed: kept in the heap or unmapped
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    np.ones(16 * 2 ** 20, np.uint8)  # written page by page, as a layer writes its output
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc', reason='glibc only')
@pytest.mark.parametrize('img_size, reused', [(224, True), (1024, False)])
def test_batched_statistics_reuse_freed_blocks_of_tens_of_mib_at_the_usual_sizes(img_size, reused):
    """A 16 MiB block (a batch's activation at 224) freed and allocated again, five times: at 224 the heap
    keeps it and no page is faulted in again; at 1024 it is unmapped and every time its pages are faulted in
    again (at least its eight 2 MiB pages, where NumPy asks for huge pages; 4,096 small pages otherwise)."""
    result = subprocess.run([sys.executable, '-c', _FAULTS_OF_FREED_BLOCKS, str(img_size)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    faults = int(result.stdout.split()[-1])
    assert faults < 8 if reused else faults >= 5 * 8, faults


_FAULTS_OF_DISPLAY_BUFFERS = r'''
import resource
import torch
from t2t_viz.allocator import display_buffers

def faults_of_five_copies():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        display_buffers.empty((512, 128, 128), torch.float16).fill_(1.0)  # a kept 16 MiB copy, then dropped
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

display_buffers.empty((512, 128, 128), torch.float16).fill_(1.0)
reused = faults_of_five_copies()
display_buffers.release()
print(reused, faults_of_five_copies())
'''


@pytest.mark.skipif(platform.system() != 'Linux', reason='page-fault counts of Linux')
def test_display_copies_reuse_their_memory_without_faulting_it_in_again():
    """Five 16 MiB display copies made and dropped in turn: in the buffer an earlier copy left, no page is
    faulted in again; once the idle buffers are released, the memory really went back to the kernel and the
    next copy faults its pages in again (4,096 small ones, or eight 2 MiB ones where the kernel gives them)."""
    result = subprocess.run([sys.executable, '-c', _FAULTS_OF_DISPLAY_BUFFERS], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    reused, released = map(int, result.stdout.split())
    assert reused < 8 <= released, (reused, released)


@pytest.mark.parametrize('name', ['resnet18', 't2t_vit_7'])  # channel-major maps; token-major, with a class token
def test_each_image_of_a_batch_gets_the_statistics_of_its_own_pass(chelsea, name):
    """Two photos in one pass, the statistics of the batch reduced at once (StatisticsReduce.batch), with the
    app's float16 display copies (written by the kernels as they read a CNN's maps): every layer's figures
    and copy of each photo equal those of a pass of that photo alone (to the last few bits, which a batch of
    two changes in the forward's own arithmetic), and the two photos' figures differ."""
    from skimage import data
    torch.manual_seed(0)
    loaded = _loaded(name, timm.create_model(name).eval())
    thresholds = Thresholds(massive_factor=20.0)
    app = {'dtype': torch.float16, 'max_side': 128}
    both = inspect_images(loaded, [chelsea, Image.fromarray(data.coffee())], thresholds, **app)
    for photo, result in zip((chelsea, Image.fromarray(data.coffee())), both):
        alone = inspect_images(loaded, [photo], thresholds, **app)[0]
        for mine, theirs in zip(result.capture.layers, alone.capture.layers):
            torch.testing.assert_close(mine.fmap.float(), theirs.fmap.float(), rtol=2e-3, atol=2e-3)
        for mine, theirs in zip(result.summaries, alone.summaries):
            assert (mine.dead_ids, mine.flat_ids, mine.massive_ids) == \
                (theirs.dead_ids, theirs.flat_ids, theirs.massive_ids), mine.name
            assert mine.median_abs == pytest.approx(theirs.median_abs, rel=1e-4), mine.name
            assert mine.max_token_norm == pytest.approx(theirs.max_token_norm, rel=1e-4), mine.name
            assert [t.channel for t in mine.top] == [t.channel for t in theirs.top], mine.name
            torch.testing.assert_close(mine.token_norms, theirs.token_norms, rtol=1e-4, atol=0)
            torch.testing.assert_close(mine.stats.mean, theirs.stats.mean, rtol=1e-4, atol=1e-6)
            assert [token.norm for token in mine.prefix] == \
                pytest.approx([token.norm for token in theirs.prefix], rel=1e-4), mine.name  # the class token
    for first, second in zip(*(result.summaries for result in both)):
        assert not torch.allclose(first.token_norms, second.token_norms, rtol=1e-3), first.name
