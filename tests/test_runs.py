"""Runs that scale: one row order whatever the batch size, resumable runs (kill -9 included), shards that merge
into the files of one run."""
import contextlib
import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from skimage import data

import t2t_viz  # noqa: F401  (registers T2T-ViT)
from t2t_viz.cli import main, partial_path, shard_inputs
from t2t_viz.dataset import StatsRun
from t2t_viz.partial import load_partial

MODELS = ('resnet18', 't2t_vit_7')
PHOTOS = (data.chelsea, data.coffee, data.astronaut, data.rocket, data.camera, data.immunohistochemistry)


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """Eight small photos (one unreadable file among them) and fixed weights for both models."""
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(checkpoints))
    torch.manual_seed(0)
    for name in MODELS:
        torch.save(timm.create_model(name).state_dict(), checkpoints / f'{name}.pth')
    images = tmp_path / 'images'
    images.mkdir()
    for i in range(7):
        photo = Image.fromarray(PHOTOS[i % len(PHOTOS)]()).convert('RGB').rotate(40 * (i // len(PHOTOS)))
        photo.resize((112, 84)).save(images / f'{i:02d}.png')
    (images / '03b.png').write_bytes(b'not an image')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _stats(*extra: str) -> int:
    command = ['stats', 'images']
    for name in MODELS:
        command += ['--model', name]
    return main(command + list(extra))


def _read(path) -> list:
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def test_rows_come_in_input_order_then_model_procedure_depth_whatever_the_batch_size(folder):
    assert _stats('-o', 'b1.csv', '--batch-size', '1', '--procedure', 'both') == 1  # one file is unreadable
    assert _stats('-o', 'b3.csv', '--batch-size', '3', '--procedure', 'both') == 1
    one, three = _read('b1.csv'), _read('b3.csv')
    key = lambda row: (row['image'], row['model'], row['procedure'], row['layer'])  # noqa: E731
    assert [key(r) for r in one] == [key(r) for r in three]
    images = [r['image'] for r in one]
    assert sorted(set(images)) == [f'images/{i:02d}.png' for i in range(7)]
    assert images == sorted(images)  # input order first
    first = [r for r in one if r['image'] == 'images/00.png']
    groups = [(r['model'], r['procedure']) for r in first]
    assert [group for i, group in enumerate(groups) if i == 0 or group != groups[i - 1]] == [
        ('resnet18', 'real_forward'), ('resnet18', 'paper_notebook'), ('t2t_vit_7', 'real_forward'),
        ('t2t_vit_7', 'notebook_analogue')]  # then model, then procedure
    assert [int(r['depth']) for r in first if r['model'] == 'resnet18' and r['procedure'] == 'real_forward'] == \
        list(range(21))
    for a, b in zip(one, three):
        assert float(a['max_abs']) == pytest.approx(float(b['max_abs']), rel=1e-5)


def test_shards_merge_into_the_files_of_one_run_byte_for_byte(folder, capsys):
    assert _stats('-o', 'one.csv', '--per-channel', 'one_ch.csv', '--top-examples', 'one_top.csv',
                  '--batch-size', '1') == 1
    for index in (1, 2, 3):
        _stats('-o', f's{index}.csv', '--shard', f'{index}/3', '--top-examples', f's{index}_top.csv',
               '--batch-size', '1')
    assert main(['merge', 's3.csv', 's1.csv', 's2.csv.partial', '-o', 'm.csv', '--per-channel', 'm_ch.csv',
                 '--top-examples', 'm_top.csv']) == 0
    for mine, theirs in (('m.csv', 'one.csv'), ('m_ch.csv', 'one_ch.csv'), ('m_top.csv', 'one_top.csv')):
        assert Path(mine).read_bytes() == Path(theirs).read_bytes(), mine
    merged = load_partial(partial_path('s1.csv')).inputs + load_partial(partial_path('s2.csv')).inputs
    assert merged + load_partial(partial_path('s3.csv')).inputs == sorted(str(p) for p in Path('images').iterdir())
    assert '3 shards, 7 image(s) -> m.csv; 1 skipped' in capsys.readouterr().out


def test_shards_with_larger_batches_give_the_same_rows_within_rounding(folder):
    _stats('-o', 'one.csv', '--per-channel', 'one_ch.csv', '--batch-size', '4')
    for index in (1, 2):
        _stats('-o', f's{index}.csv', '--shard', f'{index}/2', '--batch-size', '4')
    assert main(['merge', 's1.csv', 's2.csv', '-o', 'm.csv', '--per-channel', 'm_ch.csv']) == 0
    one, merged = _read('one.csv'), _read('m.csv')
    assert [(r['image'], r['layer']) for r in one] == [(r['image'], r['layer']) for r in merged]
    for a, b in zip(one, merged):
        assert a['dead_ids'] == b['dead_ids']
        assert float(a['median_abs']) == pytest.approx(float(b['median_abs']), rel=1e-5, abs=1e-12)
    assert Path('m_ch.csv').read_text() == Path('one_ch.csv').read_text()


def test_merge_refuses_missing_unfinished_or_foreign_shards(folder, capsys):
    _stats('-o', 's1.csv', '--shard', '1/3')
    _stats('-o', 's3.csv', '--shard', '3/3')
    assert main(['merge', 's1.csv', 's3.csv', '-o', 'm.csv']) == 2
    assert 'shards 1/N ... N/N of one run, each once: got 1/3, 3/3' in capsys.readouterr().err
    main(['stats', 'images', '--model', 'resnet18', '-o', 's2.csv', '--shard', '2/3'])
    assert main(['merge', 's1.csv', 's2.csv', 's3.csv', '-o', 'm.csv']) == 2
    assert 'partials of different runs' in capsys.readouterr().err
    assert main(['merge', 'nothing.csv', '-o', 'm.csv']) == 2
    assert 'no readable partial beside it' in capsys.readouterr().err


def test_resume_after_an_interruption_writes_the_files_of_an_uninterrupted_run(folder, monkeypatch):
    assert _stats('-o', 'whole.csv', '--per-channel', 'whole_ch.csv', '--top-examples', 'whole_top.csv',
                  '--batch-size', '2') == 1
    calls = []
    original = StatsRun.add_batch

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # batches 1-3 wrote rows; the partial was saved after batch 2
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StatsRun, 'add_batch', interrupted)
    with pytest.raises(KeyboardInterrupt):
        _stats('-o', 'cut.csv', '--per-channel', 'cut_ch.csv', '--top-examples', 'cut_top.csv', '--batch-size', '2',
               '--save-every', '4')
    saved = load_partial(partial_path('cut.csv'))
    assert saved.inputs_done == 4 and Path('cut.csv').stat().st_size > saved.rows_bytes  # rows past the save
    monkeypatch.setattr(StatsRun, 'add_batch', original)
    assert _stats('-o', 'cut.csv', '--per-channel', 'cut_ch.csv', '--top-examples', 'cut_top.csv', '--batch-size',
                  '2', '--save-every', '4', '--resume') == 1
    for mine, theirs in (('cut.csv', 'whole.csv'), ('cut_ch.csv', 'whole_ch.csv'), ('cut_top.csv', 'whole_top.csv')):
        assert Path(mine).read_bytes() == Path(theirs).read_bytes(), mine


def test_resume_after_kill_9(folder):
    for path in sorted(Path('images').glob('0[0-6].png')):  # 29 inputs: the kill lands well before the end
        for copy in range(3):
            (Path('images') / f'{path.stem}_{copy}.png').write_bytes(path.read_bytes())
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    command = [sys.executable, '-m', 't2t_viz', 'stats', 'images', '--model', 'resnet18', '--batch-size', '1',
               '--save-every', '1', '--top-examples']
    subprocess.run(command + ['whole_top.csv', '-o', 'whole.csv'], env=env, check=False, capture_output=True)
    process = subprocess.Popen(command + ['cut_top.csv', '-o', 'cut.csv'], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if partial_path('cut.csv').exists() and load_partial(partial_path('cut.csv')).inputs_done >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_partial(partial_path('cut.csv')).inputs_done < 29  # killed before the end
    subprocess.run(command + ['cut_top.csv', '-o', 'cut.csv', '--resume'], env=env, check=False, capture_output=True)
    assert Path('cut.csv').read_bytes() == Path('whole.csv').read_bytes()
    assert Path('cut_top.csv').read_bytes() == Path('whole_top.csv').read_bytes()


def test_resume_refuses_another_run(folder, capsys):
    _stats('-o', 'a.csv', '--batch-size', '2')
    assert main(['stats', 'images', '--model', 'resnet18', '-o', 'a.csv', '--resume']) == 2
    assert 'is of another run' in capsys.readouterr().err


def test_shards_are_contiguous_blocks_covering_every_input_once():
    inputs = [f'{i}' for i in range(10)]
    blocks = [shard_inputs(inputs, index, 3) for index in (1, 2, 3)]
    assert blocks == [['0', '1', '2'], ['3', '4', '5'], ['6', '7', '8', '9']]
    assert shard_inputs(inputs[:2], 3, 3) == ['1'] and shard_inputs(inputs[:2], 1, 3) == []


def test_worker_processes_prepare_the_same_inputs_byte_for_byte(folder):
    assert _stats('-o', 'here.csv', '--top-examples', 'here_top.csv', '--batch-size', '3', '--workers', '0',
                  '--procedure', 'both') == 1
    assert _stats('-o', 'workers.csv', '--top-examples', 'workers_top.csv', '--batch-size', '3', '--workers', '2',
                  '--procedure', 'both') == 1
    assert Path('workers.csv').read_bytes() == Path('here.csv').read_bytes()
    assert Path('workers_top.csv').read_bytes() == Path('here_top.csv').read_bytes()


def _as_one_ray_worker():
    """Run as each of two Ray workers on this 2-core machine does: one thread (``cluster`` sets it). With another
    thread count the numerical libraries may sum in another order: on an AMX CPU, T2T-ViT-7's statistics
    differed in the sixth digit between two threads and one."""
    return _torch_threads(max(1, (os.cpu_count() or 2) // 2))


@contextlib.contextmanager
def _torch_threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_local_ray_cluster_with_two_workers_writes_the_files_of_one_process(folder, capsys):
    pytest.importorskip('ray')
    with _as_one_ray_worker():
        assert _stats('-o', 'one.csv', '--per-channel', 'one_ch.csv', '--top-examples', 'one_top.csv',
                      '--batch-size', '1') == 1
    assert _stats('-o', 'ray.csv', '--per-channel', 'ray_ch.csv', '--top-examples', 'ray_top.csv',
                  '--batch-size', '1', '--ray', '--ray-workers', '2') == 1  # the unreadable file, as in one process
    for mine, theirs in (('ray.csv', 'one.csv'), ('ray_ch.csv', 'one_ch.csv'), ('ray_top.csv', 'one_top.csv')):
        assert Path(mine).read_bytes() == Path(theirs).read_bytes(), mine
    err = capsys.readouterr().err
    assert 'ray: 2 worker(s) on 1 node(s)' in err and 'skipped: images/03b.png' in err
    assert '7 image(s) x 2 model(s) (resnet18 trained, t2t_vit_7 trained weights) on Ray -> ray.csv' in err


def test_batch_size_auto_takes_the_largest_batch_the_estimate_fits(folder, monkeypatch, capsys):
    from t2t_viz import dataset
    monkeypatch.setattr(dataset.memory, 'available_bytes', lambda device=None: 2**40)
    assert _stats('-o', 'auto.csv', '--batch-size', 'auto') == 1
    assert '--batch-size auto: 64' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['stats', 'images', '--model', 'resnet18', '-o', 'x.csv', '--batch-size', '0'])


def _kill_the_first_busy_ray_worker(killed: list, stop) -> None:
    """SIGKILL the first Ray actor process seen running a shard (its process title while a task runs)."""
    while not stop.is_set() and not killed:
        for entry in Path('/proc').iterdir():
            try:
                title = (entry / 'cmdline').read_bytes()
            except OSError:
                continue
            if entry.name.isdigit() and title.startswith(b'ray::_Worker.run'):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                return
        time.sleep(0.005)


@pytest.mark.skipif(not Path('/proc').is_dir(), reason='finds the worker through /proc')
def test_a_ray_worker_killed_mid_shard_is_replaced_and_the_files_equal_one_process(folder, capsys):
    import threading
    pytest.importorskip('ray')
    with _as_one_ray_worker():
        assert _stats('-o', 'one.csv', '--per-channel', 'one_ch.csv', '--top-examples', 'one_top.csv',
                      '--batch-size', '1', '--procedure', 'both') == 1
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=_kill_the_first_busy_ray_worker, args=(killed, stop))
    killer.start()
    try:
        assert _stats('-o', 'ray.csv', '--per-channel', 'ray_ch.csv', '--top-examples', 'ray_top.csv',
                      '--batch-size', '1', '--procedure', 'both', '--ray', '--ray-workers', '2') == 1
    finally:
        stop.set()
        killer.join()
    assert killed, 'no worker was seen running a shard'
    for mine, theirs in (('ray.csv', 'one.csv'), ('ray_ch.csv', 'one_ch.csv'), ('ray_top.csv', 'one_top.csv')):
        assert Path(mine).read_bytes() == Path(theirs).read_bytes(), mine
    err = capsys.readouterr().err
    assert 'ray: a worker died during shard' in err and 'a new worker takes it again (retry 1 of 2)' in err
