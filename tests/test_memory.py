"""Memory estimates from what the code allocates, checked against the same code run for real."""
import gc
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch

from t2t_viz import capture, kernels, memory, zoo
from t2t_viz.allocator import ReusedBuffers, display_buffers
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


class _LiveWithDisplayCopies(LiveBytes):
    """LiveBytes plus the display buffers in use: kept copies live outside PyTorch's allocator."""

    def __init__(self):
        super().__init__()
        self._display_before = display_buffers.in_use_bytes
        self.peak_with_display = 0

    @property
    def live_with_display(self) -> int:
        return self.live + display_buffers.in_use_bytes - self._display_before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak_with_display = max(self.peak_with_display, self.live_with_display)
        return out


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_patch16_224', 't2t_vit_7'])
def test_meta_estimate_equals_the_allocations_of_the_real_run(name, monkeypatch):
    """The shape-only run allocates what the real run allocates (same code, same options: PyTorch's reductions,
    which meta maps get; the fused CPU kernels need less, see the next test)."""
    monkeypatch.setattr(kernels, '_SWITCHED_OFF', True)
    options = dict(reduce=layer_stats, dtype=torch.float16, max_side=32)
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, 3, 224, 224)
    real = _LiveWithDisplayCopies()
    with real:
        captures = capture.run(model, x, **options)
        kept_real = real.live_with_display
    kept_by_result = nbytes(captures)
    meta_model = zoo.build_on_meta(name)
    estimate_peak, estimate_kept = memory.measure_run(
        lambda meta_x: capture.run(meta_model, meta_x, **options), tuple(x.shape))
    input_bytes = memory.INPUT_COPIES * x.numel() * 4
    assert estimate_peak - input_bytes == pytest.approx(real.peak_with_display, rel=0.02)
    assert estimate_kept == pytest.approx(kept_real, rel=0.02)
    assert kept_by_result == kept_real  # what is still alive is exactly what the captures hold


@pytest.mark.skipif(not kernels.fused_available(), reason='numba is not installed')
@pytest.mark.parametrize('shape, plant', [((64, 512, 512), 'relu'), ((64, 512, 512), 'ties'),
                                          ((192, 14, 14), 'signed'), ((1, 1, 3), 'signed')])
def test_the_fused_kernels_need_no_more_memory_than_the_estimate_counts(shape, plant):
    """Statistics of one map: what the CPU kernels allocate (NumPy, seen by tracemalloc, and tensors) stays
    under what the meta trace of PyTorch's reductions counts for them. 'ties': a third of the values share
    the median's |x|, the most the kernels ever collect."""
    generator = torch.Generator().manual_seed(0)
    fmap = torch.randn(shape, generator=generator)
    fmap = torch.relu(fmap + 0.3) if plant == 'relu' else fmap
    if plant == 'ties':
        fmap[fmap.abs() < 0.4] = 0.25
    with LiveBytes() as counted:
        layer_stats(torch.empty(shape, device='meta'))
    with LiveBytes() as tensors:  # its own bookkeeping is Python objects: apart from tracemalloc's count
        layer_stats(fmap)
    tracemalloc.start()
    try:
        layer_stats(fmap)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0 < numpy_peak and tensors.peak + numpy_peak <= counted.peak + 8192  # Python objects


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
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: 200 * 2**20)
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


def _cgroup_tree(root, lines, files):
    proc = root / 'cgroup'
    proc.write_text(lines)
    for relative, text in files.items():
        path = root / 'fs' / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return proc, root / 'fs'


def test_cgroup_v2_limit_is_the_tightest_of_the_cgroup_and_its_parents(tmp_path):
    proc, root = _cgroup_tree(tmp_path, '0::/app/worker\n', {
        'app/memory.max': str(3 * 2**30), 'app/memory.current': str(2**30), 'app/memory.stat': 'anon 1\n',
        'app/worker/memory.max': 'max', 'app/worker/memory.current': str(2**29),
        'app/worker/memory.stat': 'anon 5\ninactive_file 1000\n'})
    assert memory.cgroup_available(proc, root) == 2 * 2**30  # the parent's 3 GiB, 1 GiB of it used
    (root / 'app/worker/memory.max').write_text(str(2**30))
    assert memory.cgroup_available(proc, root) == 2**30 - 2**29 + 1000  # reclaimable page cache is not in use


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    proc, root = _cgroup_tree(tmp_path, '4:memory:/job\n3:cpu:/\n', {
        'memory/job/memory.limit_in_bytes': str(4 * 2**30), 'memory/job/memory.usage_in_bytes': str(2**30),
        'memory/job/memory.stat': 'total_inactive_file 0\n',
        'memory/memory.limit_in_bytes': '9223372036854771712'})
    assert memory.cgroup_available(proc, root) == 3 * 2**30
    (root / 'memory/job/memory.limit_in_bytes').write_text('9223372036854771712')  # v1's "unlimited"
    assert memory.cgroup_available(proc, root) is None
    assert memory.cgroup_available(tmp_path / 'missing', root) is None


def test_a_container_limit_refuses_what_the_host_could_hold(monkeypatch):
    monkeypatch.setattr(memory, 'cgroup_available', lambda: 100 * 2**20)  # a 100 MiB container on a big host
    assert memory.available_bytes() == 100 * 2**20
    with pytest.raises(InsufficientMemory, match='needs about 1.1 GiB, but only 100.0 MiB of memory'):
        zoo.load('vit_large_patch16_224', device='cpu', allow_download=False)


def test_idle_display_buffers_are_given_back_before_a_refusal(monkeypatch):
    """Memory kept for reusing display copies is not held against a request: when the host falls short, the
    idle buffers are unmapped and the memory measured again; only then is the request refused."""
    display_buffers.release()
    kept = display_buffers.empty((4, 2**20), torch.float16)  # 8 MiB, idle once dropped
    del kept
    assert display_buffers.idle_bytes == 8 * 2**20
    monkeypatch.setattr(memory, '_host_available', lambda: 2**30 if display_buffers.idle_bytes == 0 else 2**20)
    monkeypatch.setattr(memory, 'cgroup_available', lambda: None)
    memory.check_fits(512 * 2**20, 'a run')  # fits once the idle buffers are given back
    assert display_buffers.idle_bytes == 0
    with pytest.raises(InsufficientMemory, match='needs about 2.0 GiB, but only 1.0 GiB'):
        memory.check_fits(2 * 2**30, 'a run')
    kept = display_buffers.empty((4, 2**20), torch.float16)
    del kept
    with pytest.raises(InsufficientMemory, match='only 1.0 MiB'):
        memory.check_fits(2 * 2**30, 'a run', available=2**20)  # a figure given by the caller is taken as it is
    assert display_buffers.idle_bytes == 8 * 2**20


def test_cuda_runs_are_held_against_free_gpu_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'mem_get_info', lambda device=None: (3 * 2**30, 80 * 2**30))
    assert memory.available_bytes('cuda') == 3 * 2**30
    memory.check_fits(2 * 2**30, 'a run', device=torch.device('cuda'))
    with pytest.raises(InsufficientMemory, match='needs about 4.0 GiB, but only 3.0 GiB of GPU memory'):
        memory.check_fits(4 * 2**30, 'a run', device='cuda')


@pytest.mark.parametrize('size', [224, 2048])
def test_resizing_an_upload_allocates_no_more_than_counted(size):
    """Peak RSS of preprocessing a 48 MP photo, measured in a fresh process, against what the checks count."""
    import json
    import subprocess
    import sys
    child = '''
import json, sys
from PIL import Image
from t2t_viz.images import preprocess, preprocess_bytes
from t2t_viz.memory import INPUT_COPIES

def peak():
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))

size = int(sys.argv[1])
config = dict(input_size=(3, size, size), interpolation='bicubic', mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875)
image = Image.new('RGB', (8000, 6000), (10, 20, 30))
preprocess(Image.new('RGB', (64, 48)), config)  # the transforms' first-call set-up is not the resize
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # the peak starts again from the current RSS
before = peak()
x = preprocess(image, config)
counted = preprocess_bytes(image, config) + INPUT_COPIES * x.numel() * 4
print(json.dumps(dict(measured=peak() - before, counted=counted)))
'''
    result = json.loads(subprocess.run([sys.executable, '-c', child, str(size)], capture_output=True, text=True,
                                       check=True).stdout)
    assert result['counted'] >= result['measured'] > 0.4 * result['counted'], result


def test_a_display_buffer_is_reused_only_once_every_tensor_made_from_it_is_gone():
    buffers = ReusedBuffers(max_idle_bytes=2**20)
    first = buffers.empty((2, 64, 32, 32), torch.float16)  # 256 KiB
    first.fill_(1.0)
    address = first.data_ptr()
    one_image = first[1]  # a view, as a Layer keeps its image's map
    del first
    second = buffers.empty((2, 64, 32, 32), torch.float16)
    assert second.data_ptr() != address and buffers.in_use_bytes == 2 * 2**18 and buffers.idle_bytes == 0
    second.fill_(2.0)
    assert bool((one_image == 1.0).all())  # never written over while a view lives
    del one_image
    assert buffers.idle_bytes == 2**18 and buffers.in_use_bytes == 2**18
    assert buffers.empty((64, 2, 32, 32), torch.float16).data_ptr() == address  # same bytes, another shape
    assert buffers.empty((2, 64, 32, 32), torch.float32).data_ptr() != address  # another size: a new buffer
    assert buffers.idle_bytes == 2**18 + 2**19 and buffers.in_use_bytes == 2**18  # both temporaries died
    assert buffers.release() == 2**18 + 2**19 and buffers.idle_bytes == 0


def test_display_buffers_keep_at_most_their_idle_bytes():
    buffers = ReusedBuffers(max_idle_bytes=3 * 2**20)
    tensors = [buffers.empty((2**20,), torch.uint8) for _ in range(5)]
    assert buffers.in_use_bytes == 5 * 2**20
    del tensors
    assert buffers.idle_bytes == 3 * 2**20 and buffers.in_use_bytes == 0  # two were unmapped
    assert buffers.empty((0, 7), torch.float16).shape == (0, 7)


def test_display_buffers_shared_by_threads_stay_consistent():
    buffers = ReusedBuffers(max_idle_bytes=64 * 2**20)

    def churn(seed: int) -> bool:
        kept = []
        for i in range(200):
            tensor = buffers.empty(((seed + i) % 7 + 1, 4096), torch.float32)
            tensor.fill_(seed)
            kept = kept[-3:] + [tensor]
            if not all(bool((t == seed).all()) for t in kept):
                return False  # another thread was given memory still in use here
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(churn, range(8)))
    assert buffers.in_use_bytes == 0 and buffers.idle_bytes <= 64 * 2**20


def test_a_pass_keeps_its_copies_in_one_buffer_held_while_any_of_them_is(cloned_outputs):
    """After a first pass of a model, input shape and options, the next ones put all their copies in one
    buffer of the size the first copied: the same values. One map still held keeps that whole buffer from
    being written by later passes."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10).eval()
    cat, noise = torch.randn(1, 3, 96, 96), torch.randn(1, 3, 96, 96)
    options = dict(dtype=torch.float16, max_side=16)
    first = capture.run(model, cat, **options)[0]
    second = capture.run(model, cat, **options)[0]
    storages = {layer.fmap.untyped_storage().data_ptr() for layer in second.layers}
    assert len({layer.fmap.untyped_storage().data_ptr() for layer in first.layers}) > 1 and len(storages) == 1
    assert all(torch.equal(a.fmap, b.fmap) for a, b in zip(first.layers, second.layers))
    expected = torch.nn.functional.adaptive_avg_pool2d(cloned_outputs(model, cat, ['layer1'])['layer1'], 16)[0]
    torch.testing.assert_close(second.layer('layer1').fmap, expected.half(), rtol=1e-3, atol=1e-3)
    held = second.layer('layer4').fmap  # one small map of the pass
    held_values = held.clone()
    del first, second
    for _ in range(3):
        other = capture.run(model, noise, **options)[0]
        assert held.untyped_storage().data_ptr() not in {layer.fmap.untyped_storage().data_ptr()
                                                        for layer in other.layers}
        assert torch.equal(held, held_values)


def test_a_capture_reuses_the_display_memory_of_dropped_captures_only(cloned_outputs):
    """Display copies of a capture still held are never written by the next one; once it is dropped, the next
    capture's copies are made in its memory, with the values a fresh pass gives."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=10).eval()
    cat, noise = torch.randn(1, 3, 256, 256), torch.randn(1, 3, 256, 256)
    options = dict(dtype=torch.float16, max_side=32)
    capture.run(model, cat, **options)  # the first pass: later ones know how much to copy, into one buffer
    held = capture.run(model, cat, **options)[0]
    held_copies = {layer.name: layer.fmap.clone() for layer in held.layers}
    other = capture.run(model, noise, **options)[0]
    addresses = {layer.fmap.data_ptr() for layer in held.layers}
    assert addresses.isdisjoint(layer.fmap.data_ptr() for layer in other.layers)
    assert all(torch.equal(layer.fmap, held_copies[layer.name]) for layer in held.layers)
    del held
    again = capture.run(model, noise, **options)[0]
    assert addresses & {layer.fmap.data_ptr() for layer in again.layers}
    assert all(torch.equal(a.fmap, b.fmap) for a, b in zip(again.layers, other.layers))
    full = cloned_outputs(model, noise, ['layer1.0.act1'])['layer1.0.act1']  # (1, 64, 64, 64), pooled to 32
    expected = torch.nn.functional.adaptive_avg_pool2d(full, (32, 32))[0].half()
    torch.testing.assert_close(again.layer('layer1.0.act1').fmap, expected, rtol=1e-3, atol=1e-3)
