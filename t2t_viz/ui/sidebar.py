"""The sidebar: the image (upload first, samples as the alternative), models, device, flags, weights."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import streamlit as st
import timm

from .. import downloads, zoo
from ..images import SAMPLE_PHOTOS, ImageError, image_hash, load_image, sample_photo
from ..models import T2T_VIT_VARIANTS
from ..stats import Thresholds
from .resources import hold_image

__all__ = ['Settings', 'image_picker', 'model_settings', 'weights_panel', 'default_models']

EXTRA_MODELS = ('resnet18', 'vit_tiny_patch16_224', 'vit_base_patch16_224')
PRESET_LABELS = {'paper': "paper's weights (Figure 2)", 'timm': "today's timm weights"}


@dataclass(frozen=True)
class Settings:
    models: List[str]
    device: str
    thresholds: Thresholds


def default_models() -> List[str]:
    """The paper's trio, or T2T_VIZ_MODELS (comma-separated) for small test setups."""
    names = os.environ.get('T2T_VIZ_MODELS')
    return [n.strip() for n in names.split(',') if n.strip()] if names else list(zoo.PRESETS[zoo.DEFAULT_PRESET])


def image_picker() -> None:
    """Sets ``st.session_state.image`` / ``image_name`` / ``image_key`` from an upload or a sample."""
    sidebar = st.sidebar
    upload = sidebar.file_uploader('Drop an image here', key='upload',
                                   help='Any image Pillow reads: PNG, JPEG, WebP, TIFF, BMP, GIF...')
    sample = sidebar.selectbox('or use a sample', list(SAMPLE_PHOTOS), key='sample', disabled=upload is not None)
    source = ('upload', upload.file_id) if upload is not None else ('sample', sample)
    if st.session_state.get('image_source') == source:
        return
    try:
        name, content = (upload.name, upload.getvalue()) if upload is not None else sample_photo(sample)
        image = load_image(content, name=name)
    except ImageError as e:
        sidebar.error(str(e))
        return
    hold_image(image)
    st.session_state.image_source = source
    st.session_state.image, st.session_state.image_name = image, name
    st.session_state.image_key = image_hash(image)


def _apply_preset() -> None:
    st.session_state.models = list(zoo.PRESETS[st.session_state.preset])


def model_settings() -> Settings:
    sidebar = st.sidebar
    sidebar.header('Models')
    defaults = default_models()
    if 'models' not in st.session_state:
        st.session_state.models = defaults
    sidebar.radio('Weights of the trio', list(zoo.PRESETS), format_func=PRESET_LABELS.get, key='preset',
                  on_change=_apply_preset, horizontal=True)
    options = list(dict.fromkeys(defaults + [n for p in zoo.PRESETS.values() for n in p] + list(T2T_VIT_VARIANTS)
                                 + list(EXTRA_MODELS) + st.session_state.models))
    models = list(sidebar.multiselect('Models', options, key='models'))
    other = sidebar.text_input('Other timm model', placeholder='e.g. deit_small_patch16_224',
                               help='Refused when its weights would not fit in this server\'s memory budget')
    if other.strip() and other.strip() not in models:
        models.append(other.strip())
    device = sidebar.radio('Device', ('auto', 'cpu', 'cuda'), horizontal=True, key='device')
    with sidebar.expander('Flags'):
        thresholds = Thresholds(
            dead_atol=st.number_input('dead: max |x| <=', value=1e-6, format='%.1e', min_value=0.0),
            flat_atol=st.number_input('flat: range <=', value=1e-6, format='%.1e', min_value=0.0),
            massive_factor=st.number_input('massive channel: max |x| > this x median', value=100.0, min_value=1.0),
            high_norm_factor=st.number_input('high-norm token: norm > this x median', value=4.0, min_value=1.0))
    return Settings(models, device, thresholds)


def _missing(models: List[str]) -> List[tuple]:
    """(name, RemoteFile) of the chosen models whose trained weights are not on this machine."""
    missing = []
    for name in models:
        if timm.is_model(zoo.split_name(name)[0]) and not zoo.weights_status(name).trained:
            remote = zoo.remote_weights(name)
            if remote is not None:
                missing.append((name, remote))
    return missing


def weights_panel(models: List[str]) -> None:
    """Where the weights come from, and a button that fetches the missing ones with per-file progress."""
    missing = _missing(models)
    folder = zoo.checkpoint_folder()
    manager = downloads.manager()
    statuses = {name: manager.status(remote, folder) for name, remote in missing}
    running = any(s is not None and s.state == 'running' for s in statuses.values())
    with st.sidebar:
        st.header('Weights')
        if not missing:
            st.caption('Trained weights are on this machine for every chosen model.')
            return
        st.caption(f'{len(missing)} model(s) have no trained weights here; they run with random weights, '
                   f'labelled as such. Files go to {folder}.')
        if st.button('Fetch trained weights', disabled=running, key='fetch_weights'):
            reasons = []
            for name, remote in missing:
                reason = downloads.offline_reason(remote.url)
                if reason:
                    reasons.append(f'{name}: {reason}')
                else:
                    manager.start(remote, folder)
            if reasons:
                st.session_state.fetch_problems = reasons
            st.rerun()
        for problem in st.session_state.get('fetch_problems', []):
            st.warning(f'Nothing can be fetched for {problem}. Put the file in {folder} by hand '
                       '(see checkpoints/README.md).')
        _download_progress(missing, folder, running)


def _download_progress(missing: List[tuple], folder, running: bool) -> None:
    def show() -> None:
        manager = downloads.manager()
        still_running = False
        for name, remote in missing:
            status = manager.status(remote, folder)
            if status is None:
                st.caption(f'{name}: {remote.filename} not fetched')
            elif status.state == 'running':
                still_running = True
                total = f' of {status.total_bytes / 2**20:.0f} MiB' if status.total_bytes else ''
                st.progress(status.fraction or 0.0,
                            text=f'{name}: {status.done_bytes / 2**20:.0f} MiB{total}')
            elif status.state == 'failed':
                st.error(f'{name}: {status.error}')
            else:
                st.caption(f'{name}: {remote.filename} fetched')
        if running and not still_running:  # the last download just finished: rerun with the trained weights
            st.rerun(scope='app')

    st.fragment(show, run_every=1.0 if running else None)()
