"""The Streamlit app driven headless through AppTest, with small models."""
import csv
import dataclasses
import functools
import gc
import http.server
import io
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from skimage import data
from streamlit.testing.v1 import AppTest
from timm.models import _registry

from t2t_viz.memory import MemoryEstimate
from t2t_viz.ui.explore import TABS
from t2t_viz.ui.resources import store

from planted import resnet18_with_dead_stem_channels

SMALL = 'resnet18,vit_tiny_patch16_224,t2t_vit_7'
APP = str(Path(__file__).resolve().parent.parent / 'app.py')


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    monkeypatch.setenv('T2T_VIZ_MODELS', SMALL)
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    monkeypatch.setenv('T2T_VIZ_CHECKPOINTS', str(tmp_path / 'checkpoints'))
    monkeypatch.setenv('T2T_VIZ_CACHE_BYTES', '2G')
    store.clear()  # a fresh server for every test: nothing kept from an earlier one


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at):
    return ' '.join([m.value for m in at.markdown] + [c.value for c in at.caption]
                    + [str(w.value) for w in at.warning] + [str(e.value) for e in at.error])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def test_first_screen_offers_the_uploader_and_a_sample():
    at = _app()
    uploaders = at.get('file_uploader')
    assert [u.proto.label for u in uploaders] == ['Drop an image here']  # no click needed before dropping a file
    assert at.selectbox(key='sample').value == 'chelsea (cat)'
    assert len(at.tabs) == len(TABS)
    assert 'random weights' in _texts(at)  # no trained files here: said plainly


def test_every_tab_renders(chelsea):
    at = _app()
    for title in TABS:
        at.session_state['explore_tab'] = title
        at.run()
        assert not at.exception, (title, at.exception)
    at.session_state['explore_tab'] = 'T2T stages'
    at.run()
    assert '56×56 = 3136 → 28×28 = 784 → 14×14 = 196' in _texts(at)
    at.select_slider(key='st_step').set_value('restructurization 2').run()
    assert any('784 tokens' in str(m.value) for m in at.metric)
    at.session_state['explore_tab'] = 'Dead channels'
    at.run()
    assert 'Download CSV' in [b.label for b in at.get('download_button')]
    at.session_state['explore_tab'] = 'Compare'
    at.run()
    assert 'Download all panels' in [b.label for b in at.get('download_button')]
    at.session_state['explore_tab'] = 'Norms & massive'
    at.run()
    criteria = at.multiselect(key='nm_criteria')
    assert len(criteria.value) == 3 and criteria.value[0].startswith('Sun et al.')
    criteria.set_value(criteria.value[1:]).run()
    assert not at.exception


def test_feature_map_views_and_layer_steps():
    at = _app()
    layer = at.select_slider(key='fm_layer')
    layer.set_value(layer.options[5]).run()
    at.number_input(key='fm_channel').set_value(3).run()
    at.checkbox(key='fm_heatmap_on').check().run()
    assert len(at.get('plotly_chart')) == 1
    at.button(key='fm_next').click().run()
    assert at.select_slider(key='fm_layer').value == layer.options[6]
    for view in ('PCA colours', 'token norms', 'channels'):
        at.radio(key='fm_view').set_value(view).run()
        assert not at.exception, view
    at.selectbox(key='fm_model').set_value('t2t_vit_7').run()
    assert not at.exception


@pytest.fixture
def media(monkeypatch):
    """Every file the app hands to Streamlit's media storage (pictures, downloads), by the id in its url."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
    files = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def recording(self, path_or_data, mimetype, kind, filename=None):
        file_id = original(self, path_or_data, mimetype, kind, filename)
        files[file_id] = path_or_data
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, 'load_and_get_id', recording)
    return lambda url: files[url.rsplit('/', 1)[1].split('.')[0]]


def _pictures(at, media, caption_start: str):
    return [Image.open(io.BytesIO(media(image.url))) for element in at.get('image') for image in element.proto.imgs
            if image.caption.startswith(caption_start)]


def test_overlays_lie_on_the_image_the_model_saw(media):
    """chelsea is 451x300; every model saw a 224x224 centre crop of it, so every overlay is drawn on that."""
    at = _app()
    at.checkbox(key='fm_overlay').check().run()
    overlays = _pictures(at, media, 'over the image the model saw')
    for view in ('PCA colours', 'token norms'):
        at.radio(key='fm_view').set_value(view).run()
        overlays += _pictures(at, media, 'over the image the model saw')
    assert not at.exception and len(overlays) == 3
    assert {picture.size for picture in overlays} == {(224, 224)}


def test_norms_tab_shows_prefix_tokens_and_layers_whose_median_is_zero():
    at = _app()
    at.session_state['explore_tab'] = 'Norms & massive'
    at.run()
    table = at.dataframe[0].value
    vit = table[table.model == 'vit_tiny_patch16_224']
    assert (vit.prefix_tokens == 1).all() and (vit.prefix_max_abs > 0).all()  # the class token of every block
    assert (table[table.model == 'resnet18'].prefix_tokens == 0).all()
    assert 'prefix tokens (class, registers)' in at.get('plotly_chart')[0].proto.spec


def test_explore_csv_equals_the_clis_and_the_image_is_counted_in_the_budget(tmp_path, monkeypatch, media):
    from t2t_viz.cli import main
    from t2t_viz.images import decoded_bytes, sample_photo
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    for name in SMALL.split(','):  # the same weights for the app and the CLI
        torch.save(timm.create_model(name).state_dict(), checkpoints / f'{name}.pth')
    gc.collect()  # images of earlier tests' sessions are released
    held_before = store().stats().held
    at = _app()
    held = store().stats().held - held_before
    assert held == decoded_bytes(at.session_state.image) == 451 * 300 * 4  # 32-bit RGB pixels
    at.session_state['explore_tab'] = 'Dead channels'
    at.run()
    explore_csv = media(next(b for b in at.get('download_button') if b.label == 'Download CSV').proto.url)
    name, content = sample_photo('chelsea (cat)')
    (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert main(['stats', name, *[a for m in SMALL.split(',') for a in ('--model', m)], '-o', 'cli.csv']) == 0
    assert explore_csv.decode() == (tmp_path / 'cli.csv').read_text()


def test_upload_png_and_bad_upload_keep_working(chelsea):
    at = _app()
    at.get('file_uploader')[0].upload('cat.png', _png(chelsea.resize((320, 240))), 'image/png').run()
    assert not at.exception
    assert at.session_state.image_name == 'cat.png' and at.session_state.image.size == (320, 240)
    at.get('file_uploader')[0].set_value(('notes.png', b'not an image', 'image/png')).run()
    assert any('not an image' in str(e.value) for e in at.error), [e.value for e in at.error]
    assert at.session_state.image_name == 'cat.png' and len(at.tabs) == len(TABS)  # the previous image stays


def test_one_bad_model_does_not_stop_the_others(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_MODELS', 'resnet18,no_such_model')
    at = _app()
    assert any('unknown model' in str(e.value) for e in at.error)
    assert len(at.tabs) == len(TABS)


def test_procedures_tab_puts_both_procedures_side_by_side():
    at = _app()
    at.session_state['explore_tab'] = 'Procedures'
    at.run()
    assert "as the paper's notebooks" in _texts(at)
    at.selectbox(key='pr_model').set_value('resnet18').run()
    assert at.selectbox(key='pr_layer').value == 'conv9'  # resnet18's middle layer, in both procedures
    captions = [c.value for c in at.caption if 'channels: dead' in c.value]
    assert len(captions) == 2
    assert 'Download both panels' in [b.label for b in at.get('download_button')]


def test_attention_tab_class_token_picked_token_rollout_and_t2t_layers(monkeypatch):
    at = _app()
    at.session_state['explore_tab'] = 'Attention'
    at.run()
    assert at.selectbox(key='at_model').options == ['vit_tiny_patch16_224', 't2t_vit_7']  # no ResNet
    assert any('mean over 3 head(s) on the 14x14 grid' in c.value for c in at.caption)
    with monkeypatch.context() as patched:  # a rollout that would not fit is refused, saying what it needs
        patched.setattr('t2t_viz.ui.resources.rollout_estimate', lambda *args: MemoryEstimate(0, 2**50, 0))
        at.checkbox(key='at_rollout').check().run()
        assert any('the rollout through 5 blocks of vit_tiny_patch16_224 needs about' in e.value
                   for e in at.error), [e.value for e in at.error]
    at.run()
    assert not at.error
    at.radio(key='at_query_mode').set_value('a token I pick').run()
    at.number_input(key='at_row').set_value(3).run()
    assert any('from the token (3, 7)' in c.value for c in at.caption)
    at.selectbox(key='at_model').set_value('t2t_vit_7').run()
    at.radio(key='at_source').set_value('T2T restructurization 1').run()
    assert any('Performer' in c.value and '56x56 grid of 3136 tokens' in c.value for c in at.caption)
    at.checkbox(key='t2t1_received').check().run()
    assert not at.exception


def test_figure2_view(chelsea):
    at = _app()
    at.switch_page('t2t_viz/ui/pages/figure2.py').run()
    assert not at.exception, at.exception
    assert at.selectbox(key='f2_size').value == 1024 and at.slider(key='f2_channels').value == 36
    at.selectbox(key='f2_size').set_value(384).run()
    table = at.dataframe[0].value
    assert list(table.layer) == ['conv1', 'conv9', 'block 1', 'block 12', 'block 1', 'block 4']
    assert set(table.procedure) == {'real_forward'}
    assert 'Download Figure 2 (PNG)' in [b.label for b in at.get('download_button')]
    at.radio(key='f2_procedure').set_value('paper_notebook').run()
    table = at.dataframe[0].value
    assert list(table.procedure) == ['paper_notebook'] * 4 + ['notebook_analogue'] * 2
    assert list(table.module)[:2] == ['conv1', 'layer2.1.conv2']  # the convs themselves, as the notebook did
    at.radio(key='f2_mode').set_value('pca').run()
    assert not at.exception


def test_dataset_mode_names_bad_files_and_writes_the_clis_csvs(tmp_path, monkeypatch):
    from t2t_viz.cli import main
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    for name in SMALL.split(','):  # trained-format files, so the app and the CLI use the same weights
        torch.save(timm.create_model(name).state_dict(), checkpoints / f'{name}.pth')
    files = [(f'{i}.png', _png(Image.fromarray(load()).resize((96, 80))), 'image/png')
             for i, load in enumerate((data.chelsea, data.coffee, data.astronaut))]
    at = _app()
    at.switch_page('t2t_viz/ui/pages/dataset.py').run()
    at.get('file_uploader')[0].set_value(files + [('broken.png', b'garbage', 'image/png')]).run()
    at.number_input(key='ds_top_k').set_value(2).run()
    at.button(key='ds_run').click().run()
    assert not at.exception, at.exception
    assert any('`broken.png`: not an image Pillow can read' in m.value for m in at.markdown)
    assert [s.value for s in at.success] == ['3 images through 3 model(s)']
    assert {'Download per-image CSV', 'Download per-channel CSV'} <= {b.label for b in at.get('download_button')}
    assert len(at.get('plotly_chart')) == 6  # five band charts and the heatmap
    job = at.session_state.dataset_job
    assert store().stats().held >= sum(len(content) for _, content, _ in files)  # the job's files are counted
    for name, content, _ in files:
        (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    assert main(['stats', '0.png', '1.png', '2.png', *[a for m in SMALL.split(',') for a in ('--model', m)],
                 '-o', 'cli.csv', '--per-channel', 'cli_channels.csv', '--top-examples', 'cli_top.csv',
                 '--top-k', '2']) == 0
    assert job.csv_text() == (tmp_path / 'cli.csv').read_text()
    assert job.run.per_channel_csv() == (tmp_path / 'cli_channels.csv').read_text()
    assert job.run.top_examples_csv() == (tmp_path / 'cli_top.csv').read_text()
    strip = at.get('image')  # the first layer's channel 0: its top 2 images, each with box, crop and map
    assert len(strip) == 2 and all(image.proto.imgs[0].caption.startswith(('0.png', '1.png', '2.png'))
                                   for image in strip), [i.proto for i in strip]
    assert any(m.value.startswith('**Top 2 images of ') for m in at.markdown)
    assert 'Download top examples CSV' in {b.label for b in at.get('download_button')}
    assert 'Download the strip (PNG)' in {b.label for b in at.get('download_button')}
    selective = at.dataframe[-1].value
    assert list(selective.columns) == ['channel', 'top value', 'mean maximum', 'gap', 'top image']
    rows = list(csv.DictReader(io.StringIO(job.csv_text())))
    assert {r['weights'] for r in rows} == {'trained'} and len({r['image'] for r in rows}) == 3
    at.number_input(key='ds_channel').set_value(2).run()
    assert not at.exception


def test_weights_download_with_progress_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / 'served'
    served.mkdir()
    torch.save({'state_dict_ema': timm.create_model('t2t_vit_7').state_dict()}, served / '71.7_T2T_ViT_7.pth.tar')

    class SlowHandler(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):  # a slow server, so the progress can be seen
            while chunk := source.read(256 * 1024):
                outputfile.write(chunk)
                time.sleep(0.05)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(SlowHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    local = dataclasses.replace(_registry._model_pretrained_cfgs['t2t_vit_7'],
                                url=f'http://127.0.0.1:{server.server_address[1]}/71.7_T2T_ViT_7.pth.tar')
    for key in ('t2t_vit_7', 't2t_vit_7.in1k'):
        monkeypatch.setitem(_registry._model_pretrained_cfgs, key, local)
    monkeypatch.setenv('T2T_VIZ_MODELS', 't2t_vit_7')
    try:
        at = _app()
        assert any('71.7_T2T_ViT_7.pth.tar not fetched' in c.value for c in at.sidebar.caption)
        at.button(key='fetch_weights').click().run()  # offline: says why, starts nothing
        assert any('T2T_VIZ_OFFLINE=1' in w.value for w in at.sidebar.warning)
        monkeypatch.delenv('T2T_VIZ_OFFLINE')
        at.session_state['fetch_problems'] = []
        at.button(key='fetch_weights').click().run()
        texts = []
        for _ in range(20):  # the page shows bytes done of the total while the download runs
            texts += [p.proto.text for p in at.get('progress') if p.proto.text.startswith('t2t_vit_7:')]
            if any(' MiB of ' in text for text in texts):
                break
            time.sleep(0.2)
            at.run()
        assert any(' MiB of 16 MiB' in text for text in texts), texts
        deadline = time.time() + 60
        while not (tmp_path / 'checkpoints' / '71.7_T2T_ViT_7.pth.tar').exists() and time.time() < deadline:
            time.sleep(0.2)
        at.run()
        at.run()
        assert not at.exception
        assert not any('random weights' in str(w.value) for w in at.warning)
        assert 'trained (file:' in _texts(at)
    finally:
        server.shutdown()


def test_a_gpu_run_is_held_against_gpu_memory_and_its_resize_against_the_hosts(monkeypatch):
    from t2t_viz import memory
    from t2t_viz.ui import resources
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)  # only asked: nothing runs on a GPU here
    monkeypatch.setattr(resources, 'display_estimate', lambda *args: MemoryEstimate(100, 1000, 10))
    free = {'cuda': 1100, 'cpu': 10**12}
    monkeypatch.setattr(memory, 'available_bytes', lambda device=None: free[torch.device(device or 'cpu').type])
    image = Image.new('RGB', (4000, 3000))
    resources.run_fits('resnet18', 224, 'real_forward', None, 'cuda', image)  # weights + pass: 1100 bytes
    free['cuda'] = 1099
    with pytest.raises(memory.InsufficientMemory, match='resnet18 at 224x224 needs about 1.1 KiB, but only 1.1 KiB '
                                                        'of GPU memory'):
        resources.run_fits('resnet18', 224, 'real_forward', None, 'cuda', image)
    free['cuda'], free['cpu'] = 10**12, 10
    with pytest.raises(memory.InsufficientMemory, match='resizing the image for resnet18 at 224x224 needs about'):
        resources.run_fits('resnet18', 224, 'real_forward', None, 'cuda', image)


def _resnet18_with_dead_stem_channels(folder: Path) -> None:
    """A resnet18 weights file whose stem channels 3 and 7 are exactly zero after the ReLU on every image."""
    folder.mkdir(exist_ok=True)
    torch.save(resnet18_with_dead_stem_channels().state_dict(), folder / 'resnet18.pth')


def test_ablation_tab_dead_channels_change_nothing_and_a_live_one_does(tmp_path):
    _resnet18_with_dead_stem_channels(tmp_path / 'checkpoints')
    at = _app()
    at.session_state['explore_tab'] = 'Ablation'
    at.run()
    assert at.selectbox(key='ab_model').value == 'resnet18' and at.selectbox(key='ab_layer').value == 'conv1'
    assert any('2 dead channel(s) of 64' in c.value for c in at.caption)
    at.button(key='ab_run').click().run()
    assert not at.exception, at.exception
    assert [s.value for s in at.success] == ['No change: every logit is exactly as in the untouched pass.']
    assert any(m.value.startswith('**2 channel(s) of conv1 zeroed**: 3, 7') for m in at.markdown)
    assert [m.value for m in at.metric][0] == '0 nats'
    at.radio(key='ab_choice').set_value('top N by mean activation').run()
    at.number_input(key='ab_top').set_value(4).run()
    at.radio(key='ab_mode').set_value('mean').run()
    at.button(key='ab_run').click().run()
    assert not at.success and not at.exception
    assert float(at.metric[0].value.split()[0]) > 0 and len(at.get('plotly_chart')) == 1
    assert 'Download ablation CSV' in [b.label for b in at.get('download_button')]
    at.radio(key='ab_procedure').set_value('paper_notebook').run()
    at.button(key='ab_run').click().run()
    assert any('never reaches the classifier' in i.value for i in at.info) and not at.exception


def test_dataset_page_loads_a_finished_runs_files_and_shows_the_same_results(tmp_path, monkeypatch):
    from t2t_viz.cli import main
    checkpoints = tmp_path / 'checkpoints'
    checkpoints.mkdir()
    torch.save(timm.create_model('resnet18').state_dict(), checkpoints / 'resnet18.pth')
    monkeypatch.setenv('T2T_VIZ_MODELS', 'resnet18')
    monkeypatch.chdir(tmp_path)
    for i, load in enumerate((data.chelsea, data.coffee, data.astronaut)):
        Image.fromarray(load()).resize((96, 80)).save(tmp_path / f'{i}.png')
    assert main(['stats', '0.png', '1.png', '2.png', '--model', 'resnet18', '-o', 'run.csv', '--per-channel',
                 'channels.csv', '--top-examples', 'top.csv', '--top-k', '2']) == 0
    at = _app()
    at.switch_page('t2t_viz/ui/pages/dataset.py').run()
    for label, name in (('Per-image CSV', 'run.csv'), ('Per-channel CSV', 'channels.csv'),
                        ('Top examples CSV', 'top.csv')):
        uploader = {u.proto.label: u for u in at.get('file_uploader')}[label]
        uploader.set_value([(name, (tmp_path / name).read_bytes(), 'text/csv')]).run()
    at.button(key='ds_load').click().run()
    assert not at.exception, at.exception
    assert [s.value for s in at.success] == ['3 images through 1 model(s) (loaded from files)']
    assert len(at.get('plotly_chart')) == 6
    job = at.session_state.dataset_job
    assert job.csv_text() == (tmp_path / 'run.csv').read_text()
    assert job.run.per_channel_csv() == (tmp_path / 'channels.csv').read_text()
    assert any(m.value.startswith('**Top 2 images of conv1 channel 0**') for m in at.markdown)
    assert len(at.get('image')) == 2  # the files are on this machine: drawn again
