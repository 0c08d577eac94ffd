"""The paper's Figure 2 on the user's image: real forward pass or as the paper's notebooks, 224 to 2048."""
from __future__ import annotations

from typing import Dict, List

import pandas as pd
import streamlit as st

from .. import memory, zoo
from ..capture import REAL_FORWARD
from ..images import ImageError
from ..figure import DEFAULT_CHANNELS, DEFAULT_SIZE, Panel, compose, figure_layers, heading_for
from ..pipeline import ModelResult, layer_labels
from ..procedures import PAPER_NOTEBOOK, describe
from ..render import png_bytes
from .explore import run_models, weights_notes
from .resources import load_model
from .sidebar import Settings

__all__ = ['page', 'FIGURE_SIZES']

FIGURE_SIZES = (224, 384, 512, 768, 1024, 1536, 2048)
PROCEDURE_LABELS = {REAL_FORWARD: 'real forward pass', PAPER_NOTEBOOK: "as the paper's notebooks"}


def _pairs(settings: Settings, img_size: int, procedure: str) -> Dict[str, List[str]]:
    pairs = {}
    for name in settings.models:
        try:
            pairs[name] = list(figure_layers(layer_labels(load_model(name, img_size, settings.device), procedure)))
        except (zoo.WeightsError, ImageError, memory.InsufficientMemory, ValueError, RuntimeError):
            pairs[name] = None  # run_models reports the model's own error
    return pairs


def page(settings: Settings) -> None:
    st.title("Figure 2 of the T2T-ViT paper, on your image")
    st.caption('ResNet50 conv1 and conv25, ViT-L/16 block 1 and block 12, T2T-ViT-24 block 1 and block 12 '
               '(for other models: the first layer and the one halfway). The paper\'s authors suggest 1024 or more '
               'for maps that are not noisy; large sizes take minutes on a CPU.')
    if st.session_state.get('image') is None:
        st.info('Drop an image in the sidebar, or pick a sample.')
        return
    controls = st.columns(5)
    img_size = controls[0].selectbox('Input size', FIGURE_SIZES, index=FIGURE_SIZES.index(DEFAULT_SIZE), key='f2_size')
    procedure = controls[1].radio('Procedure', (REAL_FORWARD, PAPER_NOTEBOOK), format_func=PROCEDURE_LABELS.get,
                                  key='f2_procedure')
    channels = controls[2].slider('Channels per panel', 4, 64, DEFAULT_CHANNELS, key='f2_channels')
    mode = controls[3].radio('Panels', ('grid', 'pca'), format_func={'grid': 'channels', 'pca': 'PCA colours'}.get,
                             key='f2_mode')
    cmap = controls[4].radio('Colours', ('gray', 'viridis'), key='f2_cmap')
    st.caption(describe(procedure) + ('; T2T-ViT: our analogue, no notebook was released'
                                      if procedure == PAPER_NOTEBOOK else ''))
    pairs = _pairs(settings, img_size, procedure)
    results: Dict[str, ModelResult] = run_models(settings, img_size, procedure, layers_for=pairs.get)
    if not results:
        return
    weights_notes(results)
    rows = [[Panel(name, layer, summary, result.procedure, result.weights.label)
             for layer, summary in zip(result.capture.layers, result.summaries)] for name, result in results.items()]
    heading = heading_for(st.session_state.get('image_name', 'image'), img_size, procedure)
    picture = compose(rows, channels=channels, mode=mode, cmap=cmap, heading=heading)
    st.image(picture)
    st.download_button('Download Figure 2 (PNG)', data=lambda: png_bytes(picture), file_name=f'figure2_{img_size}.png',
                       mime='image/png', key='f2_png', on_click='ignore')
    table = pd.DataFrame([dict(model=p.model, layer=p.layer.label, module=p.layer.name, procedure=p.procedure,
                               grid=f'{p.summary.height}x{p.summary.width}', channels=p.summary.channels,
                               dead=p.summary.dead, dead_fraction=p.summary.fraction(p.summary.dead),
                               flat=p.summary.flat, flat_fraction=p.summary.fraction(p.summary.flat),
                               massive=p.summary.massive, weights=results[p.model].weights.describe())
                          for row in rows for p in row])
    st.dataframe(table, hide_index=True)
