"""Explore's Ablation tab: zero (or mean) a layer's channels in one pass, and compare with the untouched pass."""
from __future__ import annotations

from typing import Dict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from .. import memory
from ..ablation import ABLATION_COLUMNS, ABLATION_MODES, AblationResult, LayerChange, ablate, ablation_rows
from ..capture import REAL_FORWARD
from ..pipeline import ModelResult
from ..procedures import PAPER_NOTEBOOK
from ..stats import csv_text
from .resources import load_model, model_result, run_fits, store
from .sidebar import Settings

__all__ = ['render', 'CHOICES']

CHOICES = {'dead channels': 'dead', 'flat channels': 'flat', 'massive channels': 'massive',
           'top N by mean activation': 'top', 'channels I list': 'list'}
_PLOT_CONFIG = {'toImageButtonOptions': {'format': 'png', 'scale': 2}, 'displaylogo': False}


def _depth_chart(result: AblationResult) -> go.Figure:
    changes = result.layers()
    labels = [change.label for change in changes]
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=('flagged channels', 'largest |x|'))
    for flag, colour in (('dead', '#d62728'), ('flat', '#1f77b4'), ('massive', '#ff7f0e')):
        for when, dash in (('before', 'dot'), ('after', 'solid')):
            figure.add_trace(go.Scatter(
                x=labels, y=[getattr(getattr(change, when), flag) for change in changes], mode='lines+markers',
                name=f'{flag} {when}', line=dict(color=colour, dash=dash)), row=1, col=1)
    for when, dash in (('before', 'dot'), ('after', 'solid')):
        figure.add_trace(go.Scatter(x=labels, y=[LayerChange.largest(getattr(change, when)) for change in changes],
                                    mode='lines+markers', name=f'largest |x| {when}',
                                    line=dict(color='#2ca02c', dash=dash)), row=2, col=1)
    figure.update_layout(height=560, title=f'{result.label} and every later layer: untouched (dotted) vs ablated')
    return figure


def _show(result: AblationResult) -> None:
    what = f'{len(result.channels)} channel(s) of {result.label} set to their {result.mode}' \
        if result.mode == 'mean' else f'{len(result.channels)} channel(s) of {result.label} zeroed'
    st.markdown(f'**{what}**: ' + (', '.join(map(str, result.channels)) or 'none chosen'))
    if result.unchanged():
        st.success('No change: every ' + ('logit' if result.has_logits else 'later layer statistic')
                   + ' is exactly as in the untouched pass.')
    if result.has_logits:
        metrics = st.columns(2)
        metrics[0].metric('KL(untouched || ablated)', f'{result.kl_divergence():.4g} nats')
        metrics[1].metric(f'logit of the untouched top-1, "{result.before.top5[0][0]}"',
                          f'{float(result.after.capture.logits[result.top_class()]):.4g}',
                          delta=f'{result.top_logit_change():+.4g}')
        tables = st.columns(2)
        for column, title, top5 in ((tables[0], 'untouched', result.before.top5), (tables[1], 'ablated',
                                                                                   result.after.top5)):
            column.markdown(f'**Top-5, {title}**')
            column.table(pd.DataFrame(top5, columns=['class', 'probability']))
    else:
        st.info('The notebook procedure never reaches the classifier: compare the later layers below.')
    st.plotly_chart(_depth_chart(result), key='ab_chart', config=_PLOT_CONFIG)
    st.download_button('Download ablation CSV', data=lambda: csv_text(ablation_rows(result), ABLATION_COLUMNS),
                       file_name=f'{result.before.model}_{result.label}_ablation.csv', mime='text/csv',
                       key='ab_csv', on_click='ignore')


def render(results: Dict[str, ModelResult], settings: Settings, img_size: int) -> None:
    st.caption('Zero a layer\'s channels (or set each to its mean over the image) in one forward pass and compare '
               'with the untouched pass. The shared model is never changed; prefix tokens (a class token) are '
               'left as they are, so channels that are exactly zero on the grid change nothing.')
    picks = st.columns(3)
    name = picks[0].selectbox('Model', list(results), key='ab_model')
    procedure = picks[1].radio('Procedure', (REAL_FORWARD, PAPER_NOTEBOOK), key='ab_procedure', horizontal=True)
    mode = picks[2].radio('Set channels to', ABLATION_MODES, key='ab_mode', horizontal=True,
                          format_func=lambda m: 'zero' if m == 'zero' else 'their mean over the image')
    image = st.session_state.image
    image_key = st.session_state.image_key
    try:
        before = results[name] if procedure == REAL_FORWARD else model_result(
            image, image_key, name, img_size, settings.device, settings.thresholds, procedure)
    except (ValueError, memory.InsufficientMemory, RuntimeError) as e:
        st.error(f'{name}: {e}')
        return
    labels = [layer.label for layer in before.capture.layers]
    layer = st.selectbox('Layer', labels, key='ab_layer')
    summary = before.summaries[labels.index(layer)]
    rows = st.columns(2)
    choice = CHOICES[rows[0].radio('Channels', list(CHOICES), key='ab_choice', horizontal=True)]
    counts = {'dead': summary.dead, 'flat': summary.flat, 'massive': summary.massive}
    if choice == 'top':
        spec = f'top:{rows[1].number_input("N", 1, summary.channels, min(8, summary.channels), key="ab_top")}'
    elif choice == 'list':
        spec = rows[1].text_input(f'Channels (0-{summary.channels - 1}), comma-separated', '0', key='ab_list')
    else:
        spec = choice
        rows[1].caption(f'{counts[choice]} {choice} channel(s) of {summary.channels} in this layer')
    if not st.button('Ablate', type='primary', key='ab_run'):
        found = st.session_state.get('ablation')
        if found is not None and found[0] == (name, procedure, layer, spec, mode, image_key, img_size):
            _show(found[1])
        return
    try:
        run_fits(name, img_size, procedure, None, settings.device, image)
        loaded = load_model(name, img_size, settings.device)
        with st.spinner('running the untouched and the ablated pass...'):
            result = ablate(loaded, image, layer, spec, mode, procedure, settings.thresholds, before=before)
    except (ValueError, memory.InsufficientMemory, RuntimeError) as e:
        st.error(f'{name}: {e}')
        return
    store().hold(result, sum(s.token_norms.numel() * 4 for s in result.after.summaries))  # the session keeps it
    st.session_state.ablation = ((name, procedure, layer, spec, mode, image_key, img_size), result)
    _show(result)
