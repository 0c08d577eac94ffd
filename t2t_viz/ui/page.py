"""The Streamlit page: sidebar, tabs, caches. Only arranges widgets around t2t_viz's logic."""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image
from skimage import data as samples

from .. import zoo
from ..allocator import reuse_freed_memory
from ..images import ImageError, image_hash, load_image
from ..models import T2T_VIT_VARIANTS
from ..pipeline import ModelResult, inspect_images
from ..render import channel_grid, order_channels, overlay
from ..stats import Thresholds, csv_text
from ..views import compare_depths, denormalize, depth_curves, soft_split_windows, t2t_steps

SAMPLES = {'chelsea (cat)': samples.chelsea, 'coffee': samples.coffee, 'astronaut': samples.astronaut,
           'rocket': samples.rocket}
EXTRA_MODELS = ('resnet18', 'vit_tiny_patch16_224', 'vit_base_patch16_224')
SIZES = (224, 384, 448, 1024)
COMPARE_CELL = 64  # pixels per channel tile in the Compare panels


def default_models() -> List[str]:
    """The trio, or T2T_VIZ_MODELS (comma-separated) for small test setups."""
    names = os.environ.get('T2T_VIZ_MODELS')
    return [n.strip() for n in names.split(',') if n.strip()] if names else list(zoo.DEFAULT_MODELS)


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_model(name: str, img_size: int, device: str) -> zoo.LoadedModel:
    return zoo.load(name, img_size=img_size, device=device)


@st.cache_resource(max_entries=24, show_spinner=False)
def _inspect(image_key: str, name: str, img_size: int, device: str, thresholds: Thresholds,
             _image: Image.Image) -> ModelResult:
    """Activations cached by image hash, model, size, device and thresholds (bounded LRU)."""
    return inspect_images(_load_model(name, img_size, device), [_image], thresholds)[0]


def _sidebar() -> dict:
    sidebar = st.sidebar
    sidebar.header('Image')
    source = sidebar.radio('Source', ('Sample', 'Upload'), horizontal=True)
    if source == 'Upload':
        upload = sidebar.file_uploader('Image file', type=None)
        if upload is not None:
            try:
                image = load_image(upload.getvalue(), name=upload.name)
                st.session_state.image, st.session_state.image_name = image, upload.name
            except ImageError as e:
                sidebar.error(str(e))
    else:
        sample = sidebar.selectbox('Sample', list(SAMPLES))
        st.session_state.image = Image.fromarray(SAMPLES[sample]())
        st.session_state.image_name = sample.split(' ')[0] + '.png'
    sidebar.header('Models')
    defaults = default_models()
    options = list(dict.fromkeys(defaults + list(zoo.DEFAULT_MODELS) + list(T2T_VIT_VARIANTS) + list(EXTRA_MODELS)))
    models = sidebar.multiselect('Models', options, default=defaults)
    other = sidebar.text_input('Other timm model', placeholder='e.g. deit_small_patch16_224')
    if other.strip():
        models.append(other.strip())
    img_size = sidebar.selectbox('Input size', SIZES, index=0)
    device = sidebar.radio('Device', ('auto', 'cpu', 'cuda'), horizontal=True)
    sidebar.header('Flags')
    thresholds = Thresholds(
        dead_atol=sidebar.number_input('dead: max |x| <=', value=1e-6, format='%.1e', min_value=0.0),
        flat_atol=sidebar.number_input('flat: range <=', value=1e-6, format='%.1e', min_value=0.0),
        massive_factor=sidebar.number_input('massive: > x median max', value=100.0, min_value=1.0))
    return dict(models=models, img_size=img_size, device=device, thresholds=thresholds)


def _run_models(settings: dict) -> Dict[str, ModelResult]:
    image: Optional[Image.Image] = st.session_state.get('image')
    if image is None:
        st.info('Upload an image or pick a sample in the sidebar.')
        return {}
    results = {}
    key = image_hash(image)
    for name in settings['models']:
        try:
            with st.spinner(f'Loading {name} and running it on the image...'):
                loaded = _load_model(name, settings['img_size'], settings['device'])
                results[name] = _inspect(key, name, settings['img_size'], settings['device'],
                                         settings['thresholds'], image)
        except (zoo.WeightsError, ImageError, ValueError, RuntimeError) as e:
            st.error(f'{name}: {e}')
            continue
        if loaded.weights.trained:
            st.sidebar.success(f'{name}: trained weights ({loaded.weights.source}: {loaded.weights.location})')
        else:
            st.warning(f'{name}: random weights — features and statistics are not meaningful. '
                       f'{loaded.weights.note}')
    return results


@st.fragment
def _feature_maps_tab(results: Dict[str, ModelResult]) -> None:
    name = st.selectbox('Model', list(results), key='fm_model')
    result = results[name]
    labels = [f'{i}: {layer.label} ({layer.name})' for i, layer in enumerate(result.capture.layers)]
    choice = st.select_slider('Layer', options=labels, value=labels[0], key='fm_layer')
    index = labels.index(choice)
    layer, summary = result.capture.layers[index], result.summaries[index]
    left, middle, right = st.columns(3)
    count = left.slider('Channels shown', 1, layer.channels, min(64, layer.channels), key='fm_count')
    sort = middle.selectbox('Order', ('index', 'max', 'mean'), key='fm_sort')
    flagged_only = right.checkbox('Flagged only', key='fm_flagged')
    channels = order_channels(summary, sort=sort, flagged_only=flagged_only, limit=count)
    st.caption(f'{layer.name}: {layer.channels} channels on a {layer.height}x{layer.width} grid — '
               f'{summary.dead} dead (red), {summary.massive} massive (orange), {summary.flat} flat (blue)')
    if channels:
        st.image(channel_grid(layer.fmap, summary, channels), caption=f'{name} · {layer.label}')
    else:
        st.info('No flagged channels in this layer.')
    channel = st.number_input('Channel', 0, layer.channels - 1, channels[0] if channels else 0, key='fm_channel')
    values = layer.fmap[channel].float().numpy()
    figure = go.Figure(go.Heatmap(z=values, colorscale='Viridis', colorbar=dict(title='value')))
    figure.update_layout(title=f'channel {channel}', yaxis=dict(autorange='reversed', scaleanchor='x'),
                         height=420, margin=dict(l=10, r=10, t=40, b=10))
    st.plotly_chart(figure, key='fm_heatmap')
    if st.checkbox('Overlay on the image', key='fm_overlay'):
        st.image(overlay(layer.fmap[channel], st.session_state.image), caption=f'channel {channel} on the image')


def _compare_tab(results: Dict[str, ModelResult]) -> None:
    count = st.slider('Channels per panel', 4, 64, 16, key='cmp_count')
    # one tile size and layout for every panel, so a 14x14 token map sits beside a 112x112 conv map as in
    # the paper's Figure 2 (nearest-neighbour upscaling keeps the token grid visible)
    grid_columns = math.ceil(math.sqrt(count))
    columns = st.columns(len(results))
    for column, (name, result) in zip(columns, results.items()):
        labels = [layer.label for layer in result.capture.layers]
        first, second = compare_depths(result)
        column.subheader(name)
        for default, slot in ((first, 'a'), (second, 'b')):
            label = column.selectbox('Layer', labels, index=labels.index(default), key=f'cmp_{name}_{slot}')
            layer = result.capture.layer(label)
            summary = result.summaries[layer.depth]
            channels = list(range(min(count, layer.channels)))
            column.image(channel_grid(layer.fmap, summary, channels, columns=grid_columns, cell=COMPARE_CELL),
                         caption=f'{label}: dead {summary.fraction(summary.dead):.1%} of {layer.channels}')


def _stages_tab(results: Dict[str, ModelResult]) -> None:
    t2t = [name for name in results if name.startswith('t2t_vit')]
    if not t2t:
        st.info('Add a T2T-ViT model in the sidebar to step through its Tokens-to-Token stages.')
        return
    name = st.selectbox('T2T-ViT model', t2t, key='st_model')
    result = results[name]
    steps = t2t_steps(result)
    step_names = [s.name for s in steps]
    chosen = st.select_slider('Stage', options=step_names, value=step_names[1], key='st_step')
    step = steps[step_names.index(chosen)]
    splits = [s for s in steps if s.name.startswith('soft split')]
    st.markdown('**Tokens:** ' + ' → '.join(f'{s.grid[0]}×{s.grid[1]} = {s.tokens}' for s in splits))
    st.metric(f'{step.name}', f'{step.tokens} tokens', f'grid {step.grid[0]}×{step.grid[1]}, width {step.width}')
    st.caption(step.shape)
    chart = px.line(pd.DataFrame([dict(stage=s.name, tokens=s.tokens) for s in steps]), x='stage', y='tokens',
                    markers=True, log_y=True, title='Token count through the T2T module')
    st.plotly_chart(chart, key='st_chart')
    loaded = _load_model(name, st.session_state.settings['img_size'], st.session_state.settings['device'])
    model_input = denormalize(result.capture.input, loaded.data_config['mean'], loaded.data_config['std'])
    if step.layer_index is None:
        st.image(model_input, caption='input as the model sees it')
    else:
        layer, summary = result.capture.layers[step.layer_index], result.summaries[step.layer_index]
        st.image(channel_grid(layer.fmap, summary, list(range(min(32, layer.channels)))),
                 caption=f'{step.name}: first {min(32, layer.channels)} of {layer.channels} channels')
    split = loaded.model.tokens_to_token.soft_split0
    st.image(soft_split_windows(model_input, split.kernel_size, split.stride, split.padding),
             caption=f'soft split 1: overlapping {split.kernel_size}x{split.kernel_size} windows, '
                     f'stride {split.stride}, padding {split.padding}')


def _dead_tab(results: Dict[str, ModelResult]) -> None:
    curves = pd.DataFrame(depth_curves(results))
    if not curves.empty:
        for column in ('dead_fraction', 'flat_fraction', 'massive_fraction'):
            st.plotly_chart(px.line(curves, x='relative_depth', y=column, color='model', markers=True,
                                    hover_data=['label'], title=column.replace('_', ' ')), key=f'dc_{column}')
    image_name = st.session_state.get('image_name', 'image')
    rows = [row for result in results.values() for row in result.rows(image_name)]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.download_button('Download CSV', csv_text(rows), file_name='dead_channels.csv', mime='text/csv')


def _predictions_tab(results: Dict[str, ModelResult]) -> None:
    columns = st.columns(len(results))
    for column, (name, result) in zip(columns, results.items()):
        column.subheader(name)
        column.caption(f'weights: {result.weights.label}')
        column.table(pd.DataFrame(result.top5, columns=['class', 'probability']))


def main() -> None:
    st.set_page_config(page_title='t2t-viz', layout='wide')
    st.title('t2t-viz: inside ResNet, ViT and T2T-ViT')
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reuse_freed_memory()
    settings = _sidebar()
    st.session_state.settings = settings
    results = _run_models(settings)
    if not results:
        return
    tabs = st.tabs(['Feature maps', 'Compare', 'T2T stages', 'Dead channels', 'Predictions'])
    with tabs[0]:
        _feature_maps_tab(results)
    with tabs[1]:
        _compare_tab(results)
    with tabs[2]:
        _stages_tab(results)
    with tabs[3]:
        _dead_tab(results)
    with tabs[4]:
        _predictions_tab(results)
