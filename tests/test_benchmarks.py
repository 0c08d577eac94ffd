"""The benchmark scripts run as the README says (``python -m benchmarks.NAME``); small models, one round.

These tests time nothing: they only keep the scripts working. The numbers come from running them.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


CHROMIUM = '/usr/bin/chromium'
needs_chromium = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason='Debian chromium is not installed')


def _run_benchmark(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', f'benchmarks.{module}', *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, 'T2T_VIZ_OFFLINE': '1'}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_t2t_forward_against_a_reference_clone(tmp_path):
    # Stands in for a clone of the paper's code: same import path (models/t2t_vit.py), same constructor name.
    (tmp_path / 'models').mkdir()
    (tmp_path / 'models' / '__init__.py').write_text('')
    (tmp_path / 'models' / 't2t_vit.py').write_text(textwrap.dedent("""
        from t2t_viz.models.t2t_vit import T2TViT

        def t2t_vit_7():
            return T2TViT(embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.)
    """))
    out = _run_benchmark('t2t_forward', '--models', 't2t_vit_7', '--batch-sizes', '1', '--repeats', '1',
                         '--reference', str(tmp_path))
    row = re.search(r'^t2t_vit_7\s+1\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+(\S+)$', out, re.M)
    assert row, out
    assert float(row.group(4)) == 0  # the same model with the same weights


def test_capture_overhead_and_stats_throughput():
    out = _run_benchmark('capture_overhead', '--models', 'resnet18', '--repeats', '1', '--stats-images', '1')
    assert 'freed memory reused' in out
    assert re.search(r'^resnet18\s+[\d.]+\s+[\d.]+\s+-?[\d.]+%\s+21$', out, re.M), out
    assert re.search(r'stats CLI: 1 images x 1 models in [\d.]+s', out), out


def test_memory_estimate_against_measured_rss():
    out = _run_benchmark('memory_estimate', '--models', 'resnet18', '--sizes', '224', '--modes', 'app', 'stats')
    rows = re.findall(r'^resnet18\s+224\s+(app|stats)\s+[\d.]+G\s+[\d.]+G\s+[\d.]+G\s+([\d.]+)G\s+([\d.]+)G\s+'
                      r'-?[\d.]+%\s+[\d.]+$', out, re.M)
    assert [r[0] for r in rows] == ['app', 'stats'], out
    assert all(float(estimate) > 0 and float(measured) > 0 for _, estimate, measured in rows)


@needs_chromium
def test_cold_start(tmp_path):
    out = _run_benchmark('cold_start', '--models', 'resnet18', 't2t_vit_7', '--checkpoints', str(tmp_path),
                         '--later-starts', '1', '--load-rounds', '1')
    assert (tmp_path / '71.7_T2T_ViT_7.pth.tar').exists() and (tmp_path / 'resnet18.safetensors').exists()
    ratios = r'\s+[\d.]+\s+[\d.]+\s+[\d.]+x\s+[\d.]+\s+[\d.]+x$'  # read, first load and ratio, best and ratio
    for skeleton in ('built', 'unpickled'):
        assert re.search(rf'^t2t_vit_7\s+{skeleton}{ratios}', out, re.M), out
    summary = r'^resnet18, skeleton unpickled: median [\d.]+x the read for the first load, [\d.]+x for the best'
    assert re.search(summary, out, re.M), out
    floor = r'floor = import [\d.]+ s .* = [\d.]+ s; [\d.]+x'
    assert re.search(r'^first start: server start .* [\d.]+ s; ' + floor, out, re.M), out
    assert re.search(r'^later starts: median [\d.]+x the floor', out, re.M), out


@needs_chromium
def test_interaction_latency():
    out = _run_benchmark('interaction_latency', '--models', 'resnet18', 't2t_vit_7', '--steps', '1')
    assert re.search(r'^resnet18\s+[\d.]+\s+[\d.]+$', out, re.M) and re.search(r'^t2t_vit_7\s', out, re.M), out


def test_upload_memory_has_twelve_different_photographs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.upload_memory import _photos

    paths = _photos(12, tmp_path)
    assert len({p.read_bytes() for p in paths}) == 12


@needs_chromium
def test_upload_memory():
    out = _run_benchmark('upload_memory', '--uploads', '3', '--size', '384', '--models', 'resnet18')
    assert len(re.findall(r'^\s+\d+\s+\d\d_\w+\.png\s+[\d.]+\s+[\d.]+', out, re.M)) == 3, out
    assert 'growth after the third upload' in out


@needs_chromium
def test_dataset_throughput():
    out = _run_benchmark('dataset_throughput', '--images', '12', '--models', 'resnet18')  # more than start-up noise
    assert re.search(r'app dataset mode: [\d.]+ images/s = [\d.]+x the CLI', out), out


def test_app_latency():
    out = _run_benchmark('app_latency', '--models', 'resnet18', 't2t_vit_7', '--repeats', '1')
    assert re.search(r'resnet18, t2t_vit_7: bare forwards \d+ ms, upload to first grids \d+ ms = [\d.]+x', out), out
