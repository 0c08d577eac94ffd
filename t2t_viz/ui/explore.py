"""Explore one image: feature maps, compare, procedures, T2T stages, attention, norms, dead channels, ablation."""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from .. import memory, zoo
from ..capture import REAL_FORWARD, Layer
from ..figure import Panel, compose
from ..images import ImageError
from ..pipeline import ModelResult
from ..procedures import PAPER_NOTEBOOK, describe
from ..render import (blend, channel_grid, map_picture, norm_image, order_channels, overlay, pca_image, png_bytes,
                      upscale)
from ..stats import LayerSummary, csv_text
from ..views import compare_depths, depth_curves, log_axis_top, on_log_axis, soft_split_windows, t2t_steps
from . import ablation_tab, attention_tab
from .resources import load_model, model_result
from .sidebar import Settings

__all__ = ['page', 'run_models', 'weights_notes', 'EXPLORE_SIZES', 'TABS']

EXPLORE_SIZES = (224, 384, 448, 512, 768, 1024, 1536, 2048)
TABS = ('Feature maps', 'Compare', 'Procedures', 'T2T stages', 'Attention', 'Norms & massive', 'Dead channels',
        'Ablation', 'Predictions')
VIEWS = ('channels', 'PCA colours', 'token norms')
COMPARE_CELL = 64  # pixels per channel tile in the Compare panels
GRID_CELL = 64  # pixels per channel tile in the Feature maps grid: small pictures redraw fast
PROGRESS_INTERVAL_S = 0.5  # progress bars update at most this often (each update is a browser redraw)
PLOT_CONFIG = {'toImageButtonOptions': {'format': 'png', 'scale': 2}, 'displaylogo': False}
SEEN_CAPTION = 'over the image the model saw (resized and centre-cropped as in its forward pass)'


def run_models(settings: Settings, img_size: int, procedure: str = REAL_FORWARD,
               layers_for: Optional[Callable[[str], Optional[List[str]]]] = None) -> Dict[str, ModelResult]:
    """Every chosen model on the session's image, with a progress bar while a model runs.

    A model that fails (unknown, unusable weights, not enough memory) shows its error; the others go on.
    """
    image = st.session_state.get('image')
    if image is None:
        return {}
    results = {}
    for name in settings.models:
        status = st.empty()
        shown = [time.monotonic()]

        def progress(done: int, total: int, name=name, status=status, shown=shown) -> None:
            if time.monotonic() - shown[0] >= PROGRESS_INTERVAL_S:  # a fast pass draws no bar at all
                shown[0] = time.monotonic()
                status.progress(done / max(1, total), text=f'{name}: {done} of {total} layers')

        try:
            status.caption(f'{name}: loading...')
            layers = layers_for(name) if layers_for else None
            results[name] = model_result(image, st.session_state.image_key, name, img_size, settings.device,
                                         settings.thresholds, procedure, layers, progress)
        except (zoo.WeightsError, ImageError, memory.InsufficientMemory, ValueError, RuntimeError) as e:
            status.error(f'{name}: {e}')
            continue
        status.empty()
    return results


def weights_notes(results: Dict[str, ModelResult]) -> None:
    """Say plainly which models run with random weights, and where every trained model's weights come from."""
    random = {name: r for name, r in results.items() if not r.weights.trained}
    if random:
        st.warning('**Random weights** — features and statistics of ' + ', '.join(random) + ' are not meaningful. '
                   'Use **Fetch trained weights** in the sidebar, or: '
                   + ' '.join(f'{name}: {r.weights.note}.' for name, r in random.items()))
    trained = [f'{name}: {r.weights.describe()}' for name, r in results.items() if r.weights.trained]
    if trained:
        st.caption('Weights — ' + '; '.join(trained))


def _ratio(summary: LayerSummary) -> str:
    if math.isinf(summary.max_abs_ratio):
        return f'largest |x| {abs(summary.top[0].value):.3g} (the median |x| is 0)'
    return f'largest |x| {summary.max_abs_ratio:.3g}x the median'



def _download_png(label: str, make: Callable[[], np.ndarray], file_name: str, key: str) -> None:
    st.download_button(label, data=lambda: png_bytes(make()), file_name=file_name, mime='image/png', key=key,
                       on_click='ignore')


def _pooled_note(layer: Layer) -> str:
    if not layer.pooled:
        return ''
    h, w = layer.fmap.shape[1:]
    return f' Shown at {h}x{w} (average-pooled from {layer.height}x{layer.width}); statistics use the full map.'


def _layer_picture(layer: Layer, summary: LayerSummary, view: str, channels: List[int], cmap: str = 'viridis',
                   columns: Optional[int] = None, cell: Optional[int] = None) -> np.ndarray:
    if view == 'PCA colours':
        return upscale(pca_image(layer.fmap), 256)
    if view == 'token norms':
        return norm_image(summary.token_norms, summary.high_norm_mask(), min_side=256)
    return channel_grid(layer.fmap, summary, channels, columns=columns, cell=cell, cmap=cmap)


def _step_layer(labels: List[str], step: int) -> None:
    index = labels.index(st.session_state.fm_layer) if st.session_state.get('fm_layer') in labels else 0
    st.session_state.fm_layer = labels[min(len(labels) - 1, max(0, index + step))]


@st.fragment
def _feature_maps_tab(results: Dict[str, ModelResult]) -> None:
    top = st.columns([2, 4, 2])
    name = top[0].selectbox('Model', list(results), key='fm_model')
    result = results[name]
    labels = [f'{i}: {layer.label} ({layer.name})' for i, layer in enumerate(result.capture.layers)]
    if st.session_state.get('fm_layer') not in labels:
        st.session_state.fm_layer = labels[0]
    choice = top[1].select_slider('Layer', options=labels, key='fm_layer')
    view = top[2].radio('View', VIEWS, horizontal=True, key='fm_view')
    steps = st.columns([1, 1, 8])
    steps[0].button('◀ layer', key='fm_previous', on_click=_step_layer, args=(labels, -1))
    steps[1].button('layer ▶', key='fm_next', on_click=_step_layer, args=(labels, 1))
    index = labels.index(choice)
    layer, summary = result.capture.layers[index], result.summaries[index]
    st.caption(f'{layer.name}: {layer.channels} channels on a {layer.height}x{layer.width} grid — '
               f'{summary.dead} dead '
               f'(red), {summary.massive} massive (orange), {summary.flat} flat (blue); {summary.high_norm_tokens} '
               f'high-norm tokens; {_ratio(summary)}.' + _pooled_note(layer))
    if view == 'channels':
        _channels_view(name, result, layer, summary)
    elif view == 'PCA colours':
        picture = pca_image(layer.fmap)
        left, right = st.columns(2)
        left.image(upscale(picture, 320), caption='first three principal components of the tokens as RGB')
        right.image(blend(picture, result.seen_image(), 0.6, Image.NEAREST), caption=SEEN_CAPTION)
        _download_png('Download PCA map', lambda: upscale(picture, 512), f'{name}_{layer.label}_pca.png', 'fm_pca_png')
    else:
        picture = norm_image(summary.token_norms, summary.high_norm_mask(), min_side=320)
        left, right = st.columns(2)
        left.image(picture, caption=f'token L2 norms; outlined: over {summary.high_norm_factor:g}x the median '
                                    f'{summary.median_token_norm:.3g}')
        right.image(blend(picture, result.seen_image(), 0.6, Image.NEAREST), caption=SEEN_CAPTION)
        _download_png('Download norm map', lambda: picture, f'{name}_{layer.label}_norms.png', 'fm_norm_png')
        st.dataframe(pd.DataFrame([dict(value=t.value, channel=t.channel, row=t.row, col=t.col,
                                        ratio_to_median=abs(t.value) / summary.median_abs if summary.median_abs else
                                        math.inf) for t in summary.top]), hide_index=True)


def _channels_view(name: str, result: ModelResult, layer: Layer, summary: LayerSummary) -> None:
    left, middle, right = st.columns(3)
    count = left.slider('Channels shown', 1, layer.channels, min(64, layer.channels), key='fm_count')
    sort = middle.selectbox('Order', ('index', 'max', 'mean'), key='fm_sort')
    flagged_only = right.checkbox('Flagged only', key='fm_flagged')
    channels = order_channels(summary, sort=sort, flagged_only=flagged_only, limit=count)
    if channels:
        grid = channel_grid(layer.fmap, summary, channels, cell=GRID_CELL)
        st.image(grid, caption=f'{name} · {layer.label}')
        _download_png('Download grid', lambda: grid, f'{name}_{layer.label}_channels.png', 'fm_grid_png')
    else:
        st.info('No flagged channels in this layer.')
    if st.session_state.get('fm_channel', 0) >= layer.channels:
        st.session_state.fm_channel = 0
    _channel_detail(result, layer, summary)


@st.fragment
def _channel_detail(result: ModelResult, layer: Layer, summary: LayerSummary) -> None:
    """One channel; its own fragment, so stepping through channels redraws only this."""
    channel = st.number_input('Channel', 0, layer.channels - 1, key='fm_channel')
    values = layer.fmap[channel].float()
    flag = 'dead' if channel in summary.dead_ids else 'massive' if channel in summary.massive_ids else \
        'flat' if channel in summary.flat_ids else ''
    st.caption(f'channel {channel}{" (" + flag + ")" if flag else ""}: '
               f'min {float(summary.stats.minimum[channel]):.4g}, '
               f'max {float(summary.stats.maximum[channel]):.4g}, mean {float(summary.stats.mean[channel]):.4g}')
    left, right = st.columns(2)
    left.image(map_picture(values, 256), caption=f'channel {channel}')
    if right.checkbox('Over the image', key='fm_overlay'):
        right.image(overlay(values, result.seen_image()), caption=SEEN_CAPTION)
    if st.checkbox('Interactive heatmap (values on hover)', key='fm_heatmap_on'):
        figure = {'data': [{'type': 'heatmap', 'z': values.numpy(), 'colorscale': 'Viridis',
                            'colorbar': {'title': 'value'}}],
                  'layout': {'title': f'channel {channel}', 'height': 420, 'margin': dict(l=10, r=10, t=40, b=10),
                             'yaxis': {'autorange': 'reversed', 'scaleanchor': 'x'}}}
        st.plotly_chart(figure, key='fm_heatmap', config=PLOT_CONFIG)


def _compare_tab(results: Dict[str, ModelResult]) -> None:
    controls = st.columns(2)
    count = controls[0].slider('Channels per panel', 4, 64, 16, key='cmp_count')
    view = controls[1].radio('Panels', ('channels', 'PCA colours'), horizontal=True, key='cmp_view')
    # one tile size and layout for every panel, so a 14x14 token map sits beside a 112x112 conv map as in
    # the paper's Figure 2 (nearest-neighbour upscaling keeps the token grid visible)
    grid_columns = math.ceil(math.sqrt(count))
    columns = st.columns(len(results))
    panels = []
    for column, (name, result) in zip(columns, results.items()):
        labels = [layer.label for layer in result.capture.layers]
        first, second = compare_depths(result)
        column.subheader(name)
        panels.append([])
        for default, slot in ((first, 'a'), (second, 'b')):
            label = column.selectbox('Layer', labels, index=labels.index(default), key=f'cmp_{name}_{slot}')
            layer = result.capture.layer(label)
            summary = result.summaries[layer.depth]
            channels = list(range(min(count, layer.channels)))
            column.image(_layer_picture(layer, summary, view, channels, columns=grid_columns, cell=COMPARE_CELL),
                         caption=f'{label}: dead {summary.fraction(summary.dead):.1%} of {layer.channels}')
            panels[-1].append(Panel(name, layer, summary, result.procedure, result.weights.label))
    mode = 'pca' if view == 'PCA colours' else 'grid'
    _download_png('Download all panels', lambda: compose(panels, channels=count, cell=COMPARE_CELL, mode=mode,
                                                         cmap='viridis'), 'compare.png', 'cmp_png')


def _procedures_tab(results: Dict[str, ModelResult], settings: Settings, img_size: int) -> None:
    st.markdown(f'**Real forward pass** — {describe(REAL_FORWARD)}.  \n**As the paper\'s notebooks** — '
                f'{describe(PAPER_NOTEBOOK)} (T2T-ViT: our analogue, no notebook was released).')
    name = st.selectbox('Model', list(results), key='pr_model')
    real = results[name]
    notebook = run_models(Settings([name], settings.device, settings.thresholds), img_size, PAPER_NOTEBOOK).get(name)
    if notebook is None:
        return
    real_labels = [layer.label for layer in real.capture.layers]
    shared = [layer.label for layer in notebook.capture.layers if layer.label in real_labels]
    default = compare_depths(real)[1]
    label = st.selectbox('Layer (both procedures)', shared, index=shared.index(default) if default in shared else 0,
                         key='pr_layer')
    count = st.slider('Channels shown', 4, 64, 36, key='pr_count')
    columns = st.columns(2)
    panels = []
    for column, result in zip(columns, (real, notebook)):
        layer = result.capture.layer(label)
        summary = result.summaries[result.capture.layers.index(layer)]
        panels.append(Panel(f'{name} ({result.procedure})', layer, summary, result.procedure, result.weights.label))
        column.markdown(f'**{describe(result.procedure).split(":")[0]}** — `{layer.name}`')
        column.image(channel_grid(layer.fmap, summary, list(range(min(count, layer.channels))),
                                  columns=math.ceil(math.sqrt(count)), cell=COMPARE_CELL, cmap='gray'))
        column.caption(f'{layer.height}x{layer.width}, {layer.channels} channels: dead {summary.dead} '
                       f'({summary.fraction(summary.dead):.1%}), flat {summary.flat}, massive {summary.massive}'
                       + _pooled_note(layer))
    _download_png('Download both panels', lambda: compose([panels], channels=count, cell=COMPARE_CELL, cmap='gray'),
                  f'{name}_{label}_procedures.png', 'pr_png')
    rows = []
    for result in (real, notebook):
        rows += [dict(procedure=result.procedure, layer=s.label, module=s.name, dead=s.dead, flat=s.flat,
                      massive=s.massive, dead_fraction=s.fraction(s.dead))
                 for s in result.summaries if s.label in shared]
    table = pd.DataFrame(rows)
    st.plotly_chart(px.line(table, x='layer', y='dead_fraction', color='procedure', markers=True,
                            title=f'{name}: dead channel fraction, real forward vs the notebooks'),
                    key='pr_chart', config=PLOT_CONFIG)
    st.dataframe(table, hide_index=True)
    image_name = st.session_state.get('image_name', 'image')
    st.download_button('Download CSV (both procedures)',
                       data=lambda: csv_text(real.rows(image_name) + notebook.rows(image_name)),
                       file_name=f'{name}_procedures.csv', mime='text/csv', key='pr_csv', on_click='ignore')


def _stages_tab(results: Dict[str, ModelResult], settings: Settings, img_size: int) -> None:
    t2t = [name for name in results if zoo.split_name(name)[0].startswith('t2t_vit')]
    if not t2t:
        st.info('Add a T2T-ViT model in the sidebar to step through its Tokens-to-Token stages.')
        return
    top = st.columns([2, 4, 2])
    name = top[0].selectbox('T2T-ViT model', t2t, key='st_model')
    result = results[name]
    steps = t2t_steps(result)
    step_names = [s.name for s in steps]
    chosen = top[1].select_slider('Stage', options=step_names, value=step_names[1], key='st_step')
    view = top[2].radio('View', VIEWS, horizontal=True, key='st_view')
    step = steps[step_names.index(chosen)]
    splits = [s for s in steps if s.name.startswith('soft split')]
    st.markdown('**Tokens:** ' + ' → '.join(f'{s.grid[0]}×{s.grid[1]} = {s.tokens}' for s in splits))
    st.metric(f'{step.name}', f'{step.tokens} tokens', f'grid {step.grid[0]}×{step.grid[1]}, width {step.width}')
    st.caption(step.shape)
    chart = px.line(pd.DataFrame([dict(stage=s.name, tokens=s.tokens) for s in steps]), x='stage', y='tokens',
                    markers=True, log_y=True, title='Token count through the T2T module')
    st.plotly_chart(chart, key='st_chart', config=PLOT_CONFIG)
    loaded = load_model(name, img_size, settings.device)
    model_input = result.seen_image()
    if step.layer_index is None:
        st.image(model_input, caption='input as the model sees it')
    else:
        layer, summary = result.capture.layers[step.layer_index], result.summaries[step.layer_index]
        picture = _layer_picture(layer, summary, view, list(range(min(32, layer.channels))))
        st.image(picture, caption=f'{step.name}: {view}' + _pooled_note(layer))
        _download_png('Download picture', lambda: picture, f'{name}_{step.name}.png', 'st_png')
    split = loaded.model.tokens_to_token.soft_split0
    st.image(soft_split_windows(model_input, split.kernel_size, split.stride, split.padding),
             caption=f'soft split 1: overlapping {split.kernel_size}x{split.kernel_size} windows, '
                     f'stride {split.stride}, padding {split.padding}')


def _norms_tab(results: Dict[str, ModelResult]) -> None:
    curves = pd.DataFrame(depth_curves(results))
    if curves.empty:
        return
    st.plotly_chart(norms_figure(curves, st.multiselect(
        'Mark layers with massive activations by', list(MASSIVE_CRITERIA), default=list(MASSIVE_CRITERIA),
        key='nm_criteria')), key='nm_ratio', config=PLOT_CONFIG)
    st.plotly_chart(px.line(curves, x='relative_depth', y='high_norm_fraction', color='model', markers=True,
                            hover_data=['label'], title='fraction of high-norm tokens per layer'),
                    key='nm_high_norm', config=PLOT_CONFIG)
    columns = ['model', 'label', 'layer', 'max_abs', 'median_abs', 'max_abs_ratio', 'max_abs_channel',
               'max_abs_position', 'sun_massive', 'massive_count', 'high_norm_fraction']
    prefix_columns = ['prefix_tokens', 'prefix_max_abs', 'prefix_max_abs_token', 'prefix_max_abs_ratio',
                      'prefix_max_norm', 'prefix_sun_massive', 'prefix_high_norm_tokens']
    st.dataframe(curves[columns + (prefix_columns if (curves.prefix_tokens > 0).any() else [])], hide_index=True)
    if (curves.prefix_tokens > 0).any():
        st.caption('Prefix tokens (class token first, then distillation and register tokens) are not part of the '
                   "maps; their largest |x| is held against the grid's median |x|, their norms against its median "
                   'token norm.')


MASSIVE_CRITERIA = {
    "Sun et al. (|x| > 100 and > 1000x the median |x|)": 'sun_massive',
    'ours (a live channel whose max |x| is over the massive factor x the median live channel max)': 'massive_count',
    "prefix tokens over Sun et al.'s bar": 'prefix_sun_massive',
}


def norms_figure(curves: pd.DataFrame, marked_by) -> go.Figure:
    """The largest |x| over the median |x| per layer on a log axis. A layer whose median |x| is 0 (many
    ReLU layers) has an infinite ratio: it is drawn at the top edge, labelled "median 0", not dropped."""
    top = log_axis_top(list(curves.max_abs_ratio) + list(curves.prefix_max_abs_ratio))
    curves = curves.assign(ratio_shown=[on_log_axis(v, top) for v in curves.max_abs_ratio],
                           prefix_shown=[on_log_axis(v, top) for v in curves.prefix_max_abs_ratio],
                           median_zero=curves.max_abs_ratio.map(math.isinf))
    figure = px.line(curves, x='relative_depth', y='ratio_shown', color='model', markers=True, log_y=True,
                     hover_data=['label', 'max_abs', 'median_abs', 'max_abs_channel', 'max_abs_position',
                                 'sun_massive', 'massive_count'],
                     labels={'ratio_shown': 'largest |x| / median |x|'},
                     title='largest |activation| / median |activation| per layer')
    at_top = curves[curves.median_zero]
    if not at_top.empty:
        figure.add_scatter(x=at_top.relative_depth, y=at_top.ratio_shown, mode='markers+text', text='median 0',
                           textposition='bottom center', name='median |x| is 0 (ratio infinite)',
                           customdata=at_top[['model', 'label', 'max_abs']],
                           hovertemplate='%{customdata[0]} %{customdata[1]}: largest |x| %{customdata[2]:.3g}, '
                                         'median |x| 0<extra></extra>',
                           marker=dict(symbol='triangle-up', size=11, color='black'))
    prefixed = curves[curves.prefix_shown.notna()]
    if not prefixed.empty:
        figure.add_scatter(x=prefixed.relative_depth, y=prefixed.prefix_shown, mode='markers',
                           name='prefix tokens (class, registers)', customdata=prefixed[['model', 'label',
                                                                                         'prefix_max_abs']],
                           hovertemplate='%{customdata[0]} %{customdata[1]}: prefix tokens largest |x| '
                                         '%{customdata[2]:.3g}<extra></extra>',
                           marker=dict(symbol='diamond-open', size=10, color='purple'))
    for (criterion, column), symbol in zip(MASSIVE_CRITERIA.items(), ('x', 'circle-open', 'diamond')):
        if criterion in marked_by:
            marked = curves[curves[column] > 0]
            y = marked.prefix_shown if column.startswith('prefix') else marked.ratio_shown
            figure.add_scatter(x=marked.relative_depth, y=y, mode='markers', name=criterion.split(' (')[0],
                               marker=dict(symbol=symbol, size=13, color='red'))
    if any(c.startswith(('Sun', 'prefix')) for c in marked_by):
        figure.add_hline(y=1000, line_dash='dot', annotation_text='1000x median')
    return figure


def _dead_tab(results: Dict[str, ModelResult]) -> None:
    curves = pd.DataFrame(depth_curves(results))
    if not curves.empty:
        for column in ('dead_fraction', 'flat_fraction', 'massive_fraction'):
            st.plotly_chart(px.line(curves, x='relative_depth', y=column, color='model', markers=True,
                                    hover_data=['label'], title=column.replace('_', ' ')), key=f'dc_{column}',
                            config=PLOT_CONFIG)
    image_name = st.session_state.get('image_name', 'image')
    rows = [row for result in results.values() for row in result.rows(image_name)]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.download_button('Download CSV', csv_text(rows), file_name='dead_channels.csv', mime='text/csv', key='dc_csv',
                       on_click='ignore')


def _predictions_tab(results: Dict[str, ModelResult]) -> None:
    columns = st.columns(len(results))
    for column, (name, result) in zip(columns, results.items()):
        column.subheader(name)
        column.caption(f'weights: {result.weights.describe()}')
        column.table(pd.DataFrame(result.top5, columns=['class', 'probability']))


def page(settings: Settings) -> None:
    st.title('t2t-viz: inside ResNet, ViT and T2T-ViT')
    img_size = st.sidebar.selectbox('Input size', EXPLORE_SIZES, key='explore_size',
                                    help='Statistics use full maps; maps larger than 128 pixels a side are shown '
                                         'average-pooled. Sizes that would not fit in memory are refused.')
    if st.session_state.get('image') is None:
        st.info('Drop an image in the sidebar, or pick a sample.')
        return
    results = run_models(settings, img_size)
    if not results:
        return
    image = st.session_state.image
    st.caption(f'Results for {st.session_state.image_name} ({image.width}x{image.height}) at {img_size}x{img_size}')
    weights_notes(results)
    tabs = st.tabs(TABS, key='explore_tab', on_change='rerun')
    renderers = {
        'Feature maps': lambda: _feature_maps_tab(results),
        'Compare': lambda: _compare_tab(results),
        'Procedures': lambda: _procedures_tab(results, settings, img_size),
        'T2T stages': lambda: _stages_tab(results, settings, img_size),
        'Attention': lambda: attention_tab.render(results, settings, img_size),
        'Norms & massive': lambda: _norms_tab(results),
        'Dead channels': lambda: _dead_tab(results),
        'Ablation': lambda: ablation_tab.render(results, settings, img_size),
        'Predictions': lambda: _predictions_tab(results),
    }
    for tab, title in zip(tabs, TABS):
        if tab.open is not False:  # only the open tab is computed (None: a Streamlit without tab state)
            with tab:
                renderers[title]()
