"""What the pages share: the byte-budgeted store, models and results kept in it, memory checks.

Everything kept between requests goes through one :class:`~t2t_viz.store.ByteBudgetStore`, shared by
all sessions of the server (``st.cache_resource`` holds the store itself, nothing else).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional, Sequence, Tuple

import streamlit as st
from PIL import Image

from .. import memory, zoo
from ..capture import REAL_FORWARD
from ..images import decoded_bytes, preprocess_bytes
from ..pipeline import DISPLAY_DTYPE, DISPLAY_SIDE, ModelResult, display_estimate, inspect_images, rollout_estimate
from ..stats import Thresholds
from ..store import ByteBudgetStore

__all__ = ['store', 'load_model', 'model_result', 'run_fits', 'rollout_fits', 'preload', 'hold_image']

_logger = logging.getLogger(__name__)


@st.cache_resource(show_spinner=False)
def store() -> ByteBudgetStore:
    """The one store of this server process (budget: T2T_VIZ_CACHE_BYTES or T2T_VIZ_CACHE_FRACTION)."""
    return ByteBudgetStore()


def _model_key(name: str, img_size: int, device: str) -> Tuple:
    """Includes where the weights are now, so that a file that arrives replaces a random-weights model."""
    zoo.check_name(name)
    weights = zoo.weights_status(name)
    return ('model', name, img_size, device, weights.source, weights.location)


def load_model(name: str, img_size: int, device: str) -> zoo.LoadedModel:
    """The model from the store, loaded (never downloaded: the sidebar does that) when missing.

    A model whose weights are larger than the store's whole budget is refused before it is built.
    """
    shared = store()
    return shared.get_or_create(_model_key(name, img_size, device), lambda: zoo.load(
        name, img_size=img_size, device=device, allow_download=False, max_weight_bytes=shared.budget))


def preload(names: Sequence[str], img_size: int, device: str) -> None:
    """Start estimating and loading these models in the background, while the page draws its widgets.

    A cold start then reads weight files while the sidebar renders; ``model_result`` waits for a model
    still being loaded (the store creates each key once). Failures are left to ``model_result`` to report.
    """
    def work() -> None:
        for name in names:
            try:
                display_estimate(name, img_size)
                load_model(name, img_size, device)
            except Exception as e:  # noqa: BLE001 - reported where the model is used
                _logger.debug('preloading %s: %s', name, e)

    threading.Thread(target=work, name='t2t-viz-preload', daemon=True).start()


def run_fits(name: str, img_size: int, procedure: str, layers: Optional[Tuple[str, ...]], device: str,
             image: Optional[Image.Image] = None) -> None:
    """Raise InsufficientMemory when this run (and its model, if not loaded yet) would not fit now, on the
    device it runs on; ``image`` adds what resizing that image allocates (a 64 MP upload: hundreds of MB)."""
    estimate = display_estimate(name, img_size, procedure, layers)
    needed = estimate.peak
    if store().get(_model_key(name, img_size, device)) is None:
        needed += estimate.weights
    resizing = 0 if image is None else preprocess_bytes(image, zoo.data_config(name, img_size))  # on the CPU
    where = zoo.resolve_device(device)
    if where.type != 'cpu':
        memory.check_fits(resizing, f'resizing the image for {name} at {img_size}x{img_size}')
        resizing = 0
    memory.check_fits(needed + resizing, f'{name} at {img_size}x{img_size}', device=where)


def rollout_fits(name: str, img_size: int, last_block: int, device: str) -> None:
    """Raise InsufficientMemory when an attention rollout through blocks 0..last_block would not fit now."""
    estimate = rollout_estimate(name, img_size, last_block)
    needed = estimate.peak + (estimate.weights if store().get(_model_key(name, img_size, device)) is None else 0)
    memory.check_fits(needed, f'the rollout through {last_block + 1} blocks of {name}',
                      device=zoo.resolve_device(device))


def hold_image(image: Image.Image) -> None:
    """Count a session's decoded image against the store's budget while the session keeps it."""
    store().hold(image, decoded_bytes(image))


def model_result(image: Image.Image, image_key: str, name: str, img_size: int, device: str,
                 thresholds: Thresholds, procedure: str = REAL_FORWARD, layers: Optional[Sequence[str]] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> ModelResult:
    """One model's result on one image, from the store or computed (display maps float16, at most
    ``DISPLAY_SIDE`` pixels a side; ``layers`` limits the capture and stops the pass after the last)."""
    layers = tuple(layers) if layers else None
    key = ('result', image_key, _model_key(name, img_size, device), thresholds, procedure, layers)
    shared = store()
    cached = shared.get(key)
    if cached is not None:
        return cached
    run_fits(name, img_size, procedure, layers, device, image)
    loaded = load_model(name, img_size, device)
    return shared.get_or_create(key, lambda: inspect_images(
        loaded, [image], thresholds, dtype=DISPLAY_DTYPE, max_side=DISPLAY_SIDE, layers=layers,
        procedure=procedure, progress=progress, stop_early=layers is not None)[0])
