"""The Streamlit app driven headless through AppTest, with small models."""
import io
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

SMALL = 'resnet18,vit_tiny_patch16_224,t2t_vit_7'
APP = str(Path(__file__).resolve().parent.parent / 'app.py')


@pytest.fixture
def app(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_MODELS', SMALL)
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    assert not at.exception, at.exception
    return at


def _texts(at):
    return ' '.join([m.value for m in at.markdown] + [c.value for c in at.caption]
                    + [str(w.value) for w in at.warning] + [str(e.value) for e in at.error])


def test_sample_image_all_tabs(app):
    at = app
    assert len(at.tabs) == 5
    text = _texts(at)
    assert '56×56 = 3136 → 28×28 = 784 → 14×14 = 196' in text
    assert 'random weights' in text  # no trained files here: said plainly
    assert [b.label for b in at.get('download_button')] == ['Download CSV']
    layer = at.select_slider(key='fm_layer')
    layer.set_value(layer.options[5]).run()
    assert not at.exception
    at.number_input(key='fm_channel').set_value(3).run()
    at.checkbox(key='fm_overlay').check().run()
    at.selectbox(key='fm_model').set_value('t2t_vit_7').run()
    assert not at.exception
    at.select_slider(key='st_step').set_value('restructurization 2').run()
    assert not at.exception
    at.slider(key='cmp_count').set_value(9).run()
    at.selectbox(key='cmp_t2t_vit_7_b').set_value('soft split 1').run()
    assert not at.exception
    assert any('784 tokens' in str(m.value) for m in at.metric)


def test_upload_png_and_bad_upload_keep_working(app, chelsea):
    at = app
    at.sidebar.radio[0].set_value('Upload').run()
    uploader = at.get('file_uploader')
    if not uploader:
        pytest.skip('this Streamlit version has no AppTest file_uploader')
    buffer = io.BytesIO()
    chelsea.resize((320, 240)).save(buffer, format='PNG')
    uploader[0].upload('cat.png', buffer.getvalue(), 'image/png').run()
    assert not at.exception
    assert at.session_state.image_name == 'cat.png' and at.session_state.image.size == (320, 240)
    at.get('file_uploader')[0].upload('notes.png', b'not an image', 'image/png').run()
    assert any('not an image' in str(e.value) for e in at.error), [e.value for e in at.error]
    assert len(at.tabs) == 5  # previous image's results still shown


def test_one_bad_model_does_not_stop_the_others(monkeypatch):
    monkeypatch.setenv('T2T_VIZ_MODELS', 'resnet18,no_such_model')
    monkeypatch.setenv('T2T_VIZ_OFFLINE', '1')
    at = AppTest.from_file(APP, default_timeout=240)
    at.run()
    assert not at.exception
    assert any('unknown model' in str(e.value) for e in at.error)
    assert len(at.tabs) == 5
