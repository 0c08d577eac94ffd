"""The project installs the way users install it: ``pip install .`` gives a ``t2t-viz`` command."""
import os
import subprocess
import sys
import sysconfig
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pip_install_gives_the_console_command(tmp_path):
    target = tmp_path / 'venv'
    venv.create(target, with_pip=True)
    python = target / 'bin' / 'python'
    site = subprocess.check_output([str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                   text=True).strip()
    # the heavy dependencies (torch, timm...) come from this test's environment instead of the network
    Path(site, 'dependencies.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    env = {**os.environ, 'PIP_DISABLE_PIP_VERSION_CHECK': '1', 'HOME': str(tmp_path), 'T2T_VIZ_OFFLINE': '1'}
    env.pop('PYTHONPATH', None)
    install = subprocess.run([str(python), '-m', 'pip', 'install', '--quiet', str(ROOT)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    command = target / 'bin' / 't2t-viz'
    version = subprocess.run([str(command), '--version'], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert version.stdout.strip() == f't2t-viz {_version()}', version.stderr
    zoo = subprocess.run([str(command), 'zoo'], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert zoo.returncode == 0, zoo.stderr[-3000:]
    assert 't2t_vit_24' in zoo.stdout and '64.1M' in zoo.stdout
    where = subprocess.check_output([str(python), '-c', 'import t2t_viz, t2t_viz.ui.app as a; print(t2t_viz.__file__);'
                                     'print(a.PAGES_DIR.is_dir())'], text=True, env=env, cwd=tmp_path).split()
    assert where[0].startswith(str(target)) and where[1] == 'True'  # the installed copy, pages included


def _version() -> str:
    import t2t_viz
    return t2t_viz.__version__


def test_streamlit_settings_are_in_one_place():
    from t2t_viz.ui.app import SERVER_SETTINGS
    config = tomllib.loads((ROOT / '.streamlit' / 'config.toml').read_text())
    flat = {f'{section}.{key}': value for section, values in config.items() for key, value in values.items()}
    assert flat == SERVER_SETTINGS
    assert sys.version_info >= (3, 9)
