"""The Attention tab: exact attention maps of ViT / T2T-ViT blocks and of the T2T module's layers.

Recomputed from the captured input of the block asked for (:mod:`t2t_viz.attention`); the model's own
fused attention, its logits and every other map stay as they are.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image

from .. import attention, memory, zoo
from ..images import preprocess
from ..models import T2TViT
from ..pipeline import ModelResult
from ..render import blend, channel_grid, map_picture, png_bytes
from .resources import load_model, rollout_fits, run_fits, store
from .sidebar import Settings

__all__ = ['render']

BACKBONE = 'backbone block'
T2T_LAYERS = {'T2T restructurization 1': 1, 'T2T restructurization 2': 2}


def _token_model(loaded: zoo.LoadedModel) -> bool:
    try:
        attention.token_grid(loaded.model, loaded.img_size, loaded.img_size)
        return hasattr(loaded.model, 'blocks')
    except TypeError:
        return False


def _pick_token(seen: Image.Image, grid: Tuple[int, int], key: str) -> Tuple[int, int]:
    """A token picked by clicking on the image (or typed as row and column) on a (h, w) grid."""
    rows, cols = grid
    cell_h, cell_w = seen.height / rows, seen.width / cols
    ys, xs = np.mgrid[0:rows, 0:cols]
    figure = go.Figure([
        go.Image(z=np.asarray(seen)),
        go.Scatter(x=((xs + 0.5) * cell_w).ravel(), y=((ys + 0.5) * cell_h).ravel(), mode='markers',
                   marker=dict(size=max(4, 420 / max(grid)), opacity=0.05, color='white', symbol='square'),
                   customdata=np.stack([ys.ravel(), xs.ravel()], axis=1),
                   hovertemplate='token (%{customdata[0]}, %{customdata[1]})<extra></extra>')])
    figure.update_layout(height=440, margin=dict(l=0, r=0, t=30, b=0), title='click a token', showlegend=False)
    event = st.plotly_chart(figure, key=f'{key}_pick', on_select='rerun', selection_mode='points')
    points = getattr(getattr(event, 'selection', None), 'points', None) or []
    if points:
        st.session_state[f'{key}_row'] = min(rows - 1, int(points[0]['y'] // cell_h))
        st.session_state[f'{key}_col'] = min(cols - 1, int(points[0]['x'] // cell_w))
    left, right = st.columns(2)
    row = left.number_input('Row', 0, rows - 1, min(rows // 2, rows - 1), key=f'{key}_row')
    col = right.number_input('Column', 0, cols - 1, min(cols // 2, cols - 1), key=f'{key}_col')
    return int(row), int(col)


def _cached(key: Tuple, compute):
    return store().get_or_create(key, compute)


def _show_maps(maps: attention.AttentionMaps, seen: Image.Image, title: str, key: str) -> None:
    heads = maps.maps[0]  # (K, h, w)
    mean = maps.mean[0]  # (h, w)
    st.caption(f'{title}: mean over {heads.shape[0]} head(s) on the {maps.grid[0]}x{maps.grid[1]} grid')
    left, right = st.columns(2)
    picture = map_picture(mean, 320)
    left.image(picture, caption='attention weights, scaled to their range')
    right.image(blend(picture, seen, 0.55, Image.NEAREST), caption='over the image')
    if heads.shape[0] > 1:
        grid = channel_grid(heads, cell=96)
        st.image(grid, caption=f'each head ({heads.shape[0]}), each scaled to its own range')
        st.download_button('Download heads', data=lambda: png_bytes(grid), file_name=f'{key}_heads.png',
                           mime='image/png', key=f'{key}_heads_png', on_click='ignore')
    if maps.prefix.numel():
        st.caption(f'weight on the class token itself: {float(maps.prefix[0].mean()):.3f} (mean over heads)')
    st.download_button('Download map', data=lambda: png_bytes(picture), file_name=f'{key}.png', mime='image/png',
                       key=f'{key}_png', on_click='ignore')


def render(results: Dict[str, ModelResult], settings: Settings, img_size: int) -> None:
    loaded_models = {}
    for name in results:
        loaded = load_model(name, img_size, settings.device)
        if _token_model(loaded):
            loaded_models[name] = loaded
    if not loaded_models:
        st.info('Add a ViT or T2T-ViT model in the sidebar to see its attention.')
        return
    top = st.columns([2, 3])
    name = top[0].selectbox('Model', list(loaded_models), key='at_model')
    loaded = loaded_models[name]
    sources = [BACKBONE] + (list(T2T_LAYERS) if isinstance(loaded.model, T2TViT) else [])
    source = top[1].radio('Attention of', sources, horizontal=True, key='at_source')
    try:
        run_fits(name, img_size, 'real_forward', None, settings.device, st.session_state.image)
    except memory.InsufficientMemory as e:
        st.error(str(e))
        return
    result = results[name]
    seen = result.seen_image()
    x = preprocess(st.session_state.image, loaded.data_config)  # (1, 3, H, W), as the forward pass saw it
    base_key = ('attention', st.session_state.image_key, name, img_size, settings.device, loaded.weights.location)
    st.caption('Recomputed exactly from the captured input of the chosen block (the forward pass keeps its fused '
               'attention); rollout: Abnar & Zuidema (2020), 0.5 A + 0.5 I per block.')
    if source == BACKBONE:
        _backbone(loaded, x, seen, base_key, settings.device)
    else:
        _t2t_layer(loaded, x, seen, base_key, T2T_LAYERS[source])


def _backbone(loaded: zoo.LoadedModel, x: torch.Tensor, seen: Image.Image, base_key: Tuple, device: str) -> None:
    depth = len(loaded.model.blocks)
    controls = st.columns(2)
    block = controls[0].slider('Block', 1, depth, min(5, depth), key='at_block')
    mode = controls[1].radio('Query', ('class token', 'a token I pick'), horizontal=True, key='at_query_mode')
    grid = attention.token_grid(loaded.model, x.shape[-2], x.shape[-1])
    query: Optional[Tuple[int, int]] = _pick_token(seen, grid, 'at') if mode == 'a token I pick' else None
    label = 'class token' if query is None else f'token {query}'
    with st.spinner(f'attention of block {block}...'):
        maps = _cached(base_key + ('block', block, query),
                       lambda: attention.attention_maps(loaded.model, x, [block - 1], query)[block - 1])
    _show_maps(maps, seen, f'block {block}, from the {label}', f'attention_block{block}')
    if st.checkbox(f'Attention rollout through blocks 1 to {block}', key='at_rollout'):
        try:
            rollout_fits(loaded.request, loaded.img_size, block - 1, device)
        except memory.InsufficientMemory as e:
            st.error(str(e))
            return
        with st.spinner('rollout...'):
            rollout = _cached(base_key + ('rollout', block, query),
                              lambda: attention.attention_rollout(loaded.model, x, 0, block - 1, query))
        _show_maps(rollout, seen, f'rollout of the {label} through blocks 1-{block}', f'rollout_block{block}')


def _t2t_layer(loaded: zoo.LoadedModel, x: torch.Tensor, seen: Image.Image, base_key: Tuple, layer: int) -> None:
    model = loaded.model
    kind = 'softmax attention' if type(model.tokens_to_token.attention1).__name__ == 'TokenTransformer' else \
        'normalized kernel attention of its random features (Performer)'
    grid = attention.t2t_layer_grid(model, layer, x.shape[-2], x.shape[-1])
    st.caption(f'restructurization {layer}: {kind}, on its {grid[0]}x{grid[1]} grid of {grid[0] * grid[1]} tokens; '
               'there is no class token in the T2T module')
    query = _pick_token(seen, grid, f't2t{layer}')
    with st.spinner('attention...'):
        maps = _cached(base_key + ('t2t', layer, query), lambda: attention.t2t_attention_map(model, x, layer, query))
    _show_maps(maps, seen, f'restructurization {layer}, from token {query}', f't2t{layer}_attention')
    if st.checkbox('Mean attention each token receives', key=f't2t{layer}_received'):
        with st.spinner('received attention...'):
            received = _cached(base_key + ('t2t_received', layer),
                               lambda: attention.t2t_received_attention(model, x, layer))
        _show_maps(received, seen, f'restructurization {layer}: attention received', f't2t{layer}_received')
