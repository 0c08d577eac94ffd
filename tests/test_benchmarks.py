"""The benchmark scripts run as the README says (``python -m benchmarks.NAME``); small models, one round.

These tests time nothing: they only keep the scripts working. The numbers come from running them.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_benchmark(module: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, '-m', f'benchmarks.{module}', *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, 'T2T_VIZ_OFFLINE': '1'}, timeout=300)
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


def test_app_latency():
    out = _run_benchmark('app_latency', '--models', 'resnet18', 't2t_vit_7', '--repeats', '1')
    assert re.search(r'resnet18, t2t_vit_7: bare forwards \d+ ms, upload to first grids \d+ ms = [\d.]+x', out), out
