"""The app's entry point: page navigation and the sidebar the pages share.

The pages are the small scripts in ``t2t_viz/ui/pages/``; each calls one page function of :mod:`t2t_viz.ui`
with the settings the shared sidebar put in ``st.session_state.settings``.
"""
from __future__ import annotations

import os
from pathlib import Path

import streamlit as st
import torch

from ..allocator import reuse_freed_memory
from ..memory import format_bytes
from .resources import preload, store
from .sidebar import default_models, image_picker, model_settings, weights_panel

__all__ = ['main', 'PAGES', 'PAGES_DIR', 'SERVER_SETTINGS']

PAGES_DIR = Path(__file__).resolve().parent / 'pages'
PAGES = (('explore.py', 'Explore one image'), ('figure2.py', 'Figure 2'), ('dataset.py', 'Dataset statistics'))
# What .streamlit/config.toml sets for `streamlit run app.py`; `t2t-viz app` passes the same.
SERVER_SETTINGS = {
    'server.fileWatcherType': 'none',  # a served app, not a script being edited
    'server.maxUploadSize': 1024,  # MB: dataset mode takes .zip files of images
    'browser.gatherUsageStats': False,
    'client.toolbarMode': 'viewer',
    # Streamlit runs a full garbage collection after every run, fragments included: with models and
    # their results in memory that took ~0.4 s per step of a slider; reference counting frees our tensors
    'runner.postScriptGC': False,
}


def main(pages_dir: Path = PAGES_DIR) -> None:
    st.set_page_config(page_title='t2t-viz', layout='wide')
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reuse_freed_memory()
    page = st.navigation([st.Page(str(pages_dir / script), title=title, default=i == 0)
                          for i, (script, title) in enumerate(PAGES)])
    if page.title == 'Explore one image':  # read weights while the widgets are drawn
        preload(st.session_state.get('models', default_models()), st.session_state.get('explore_size', 224),
                st.session_state.get('device', 'auto'))
    if page.title != 'Dataset statistics':
        image_picker()
    settings = model_settings()
    st.session_state.settings = settings
    weights_panel(settings.models)
    page.run()
    usage = store().stats()
    st.sidebar.caption(f'Kept between requests: {format_bytes(usage.used)} of {format_bytes(usage.budget)} '
                       f'({usage.entries} models and results, shared by all sessions)')
