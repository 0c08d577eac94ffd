"""Memory estimates from what the code allocates, checked against the same code run for real."""
import gc

import pytest
import timm
import torch

from t2t_viz import capture, memory, zoo
from t2t_viz.memory import InsufficientMemory, LiveBytes
from t2t_viz.pipeline import memory_estimate
from t2t_viz.stats import layer_stats
from t2t_viz.store import nbytes


def test_live_bytes_counts_storages_once_and_frees_them():
    before = torch.empty(500, 500, device='meta')  # allocated before: its views count nothing
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000, 1000, device='meta')  # 4 MB
        view = a.t()  # shares a's storage
        b = a + 1  # 4 MB more
        del b
        c = torch.zeros(10, device='meta')
        before_view, same = before.t(), before.to('meta')
        a.add_(1)
    assert tracker.peak == 8_000_000
    assert tracker.live == 4_000_000 + 40
    del a, view, c, before_view, same
    gc.collect()
    assert tracker.live == 0


def test_replayed_statistics_allocate_what_the_statistics_allocate():
    maps = [torch.empty(64, 28, 28, device='meta') for _ in range(3)]
    direct, replayed = LiveBytes(), LiveBytes()
    with direct:
        kept = [layer_stats(m) for m in maps]
    replay = memory.ReplayedByShape(layer_stats)
    with replayed:
        kept_again = [replay(m) for m in maps]
    assert (replayed.peak, replayed.live) == (direct.peak, direct.live) and len(kept) == len(kept_again)


COMPUTING = {'linear', 'convolution', 'conv2d', 'layer_norm', 'batch_norm', 'add', 'mul', 'gelu', 'relu',
             'scaled_dot_product_attention', 'clamp', 'softmax', 'std_mean', 'linalg_vector_norm'}  # slow on meta


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224', 't2t_vit_7', 'resnet18'])
def test_replayed_meta_operations_allocate_what_running_them_allocates(name, aten_ops):
    """Outputs of operations seen before are laid out as recorded: same bytes, far fewer slow meta kernels."""
    model = zoo.build_on_meta(name)
    x = torch.empty(2, 3, 224, 224, device='meta')
    counts, measured = [], []
    for replay in (False, True):
        with aten_ops() as kernels, LiveBytes(replay=replay) as tracker:  # kernels: what reaches them
            captures = capture.run(model, x, reduce=memory.ReplayedByShape(layer_stats), dtype=torch.float16)
            measured.append((tracker.peak, tracker.live))
        counts.append(sum(op in COMPUTING for op in kernels.names))
        assert all(layer.fmap.is_meta for layer in captures[0].layers)
    assert measured[0] == measured[1]
    assert counts[1] < 0.5 * counts[0], counts


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224', 't2t_vit_7'])
def test_meta_estimate_equals_the_allocations_of_the_real_run(name):
    """The shape-only run allocates what the real run allocates (same code, same options)."""
    options = dict(reduce=layer_stats, dtype=torch.float16, max_side=32)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    real = LiveBytes()
    with real:
        captures = capture.run(model, x, **options)
        kept_real = real.live
    kept_by_result = nbytes(captures)
    meta_model = zoo.build_on_meta(name)
    estimate_peak, estimate_kept = memory.measure_run(
        lambda meta_x: capture.run(meta_model, meta_x, **options), tuple(x.shape))
    input_bytes = memory.INPUT_COPIES * x.numel() * 4
    assert estimate_peak - input_bytes == pytest.approx(real.peak, rel=0.02)
    assert estimate_kept == pytest.approx(kept_real, rel=0.02)
    assert kept_by_result == kept_real  # what is still alive is exactly what the captures hold


def test_estimate_grows_with_size_batch_and_kept_maps():
    small = memory_estimate('t2t_vit_7', 224)
    large = memory_estimate('t2t_vit_7', 448)
    batch = memory_estimate('t2t_vit_7', 224, batch=4)
    stats_only = memory_estimate('t2t_vit_7', 448, keep_maps=False)
    assert large.peak > 3 * small.peak and batch.peak > 3 * small.peak
    assert stats_only.kept < large.kept / 10  # statistics and the input only
    assert small.weights == memory.module_bytes(timm.create_model('t2t_vit_7'))


def test_the_trio_at_2048_fits_on_a_24_gib_machine():
    """The app keeps float16 display maps of at most 128 pixels a side; statistics come from full maps."""
    total = 0
    for name in zoo.PRESETS['paper']:
        estimate = memory_estimate(name, 2048, dtype=torch.float16, max_side=128)
        memory.check_fits(estimate.total, name, available=24 * 2**30)
        total += estimate.weights + estimate.kept
    assert total < 8 * 2**30
    with pytest.raises(InsufficientMemory, match=r'needs about .* GiB, but only 1.0 GiB'):
        memory.check_fits(memory_estimate('vit_large_patch16_224', 2048).total, 'ViT-L at 2048',
                          available=2**30)


def test_model_too_large_is_refused_before_it_is_built(monkeypatch, empty_cache_dir):
    built = []
    original = zoo._create

    def spy(arch, tag, pretrained, img_size, **kwargs):
        built.append(torch.empty(0).device.type)  # 'meta' inside the meta-device context
        return original(arch, tag, pretrained, img_size, **kwargs)

    monkeypatch.setattr(zoo, '_create', spy)
    monkeypatch.setattr(memory, 'available_bytes', lambda: 200 * 2**20)
    with pytest.raises(InsufficientMemory, match=r'vit_large_patch16_224 \(weights\) needs about 1.1 GiB, '
                                                 r'but only 200.0 MiB'):
        zoo.load('vit_large_patch16_224', device='cpu', allow_download=False)
    assert built and set(built) == {'meta'}  # only counted on the meta device, never allocated
    with pytest.raises(InsufficientMemory, match='over the 10.0 MiB this server allows'):
        zoo.load('t2t_vit_7', device='cpu', allow_download=False, max_weight_bytes=10 * 2**20)


def test_estimates_are_kept_on_disk_for_the_same_code_only(tmp_path):
    path = tmp_path / 'estimates.json'
    first = memory.EstimateStore(path)
    first.put('resnet18|224', memory.MemoryEstimate(1, 2, 3))
    assert memory.EstimateStore(path).get('resnet18|224') == memory.MemoryEstimate(1, 2, 3)  # another process
    other_code = memory.EstimateStore(path)
    other_code.code = 'older'
    assert other_code.get('resnet18|224') is None
    blocked = tmp_path / 'file'
    blocked.write_text('')
    unwritable = memory.EstimateStore(blocked / 'estimates.json')  # its folder cannot be made
    unwritable.put('k', memory.MemoryEstimate(1, 1, 1))
    assert unwritable.get('k') == memory.MemoryEstimate(1, 1, 1)  # still known to this process
