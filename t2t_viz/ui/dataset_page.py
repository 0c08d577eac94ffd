"""Dataset mode: many images through the chosen models, statistics only, with progress and a stop button."""
from __future__ import annotations

import io
import itertools
import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from .. import memory, zoo
from ..capture import REAL_FORWARD
from ..dataset import (Failure, FinishedRun, JobFiles, NamedImage, PathFiles, StatsRun, count_inputs, depth_bands,
                       expand_uploads, fitting_batch)
from ..examples import DEFAULT_TOP_K, Example, selective_channels
from ..images import SAMPLE_PHOTOS, ImageError, sample_photo
from ..procedures import PAPER_NOTEBOOK
from ..receptive import input_box, layer_geometry
from ..render import example_picture, png_bytes, side_by_side
from ..views import log_axis_top, on_log_axis
from .explore import PLOT_CONFIG
from .resources import load_model, model_result, store
from .sidebar import Settings

__all__ = ['page', 'DatasetJob', 'DATASET_SIZES']

DATASET_SIZES = (224, 384, 448, 512, 768, 1024, 1536, 2048)
EXAMPLE_SIDE = 160  # pixels a side of each panel of a top example
PROCEDURE_CHOICES = {'real forward pass': (REAL_FORWARD,), "as the paper's notebooks": (PAPER_NOTEBOOK,),
                     'both': (REAL_FORWARD, PAPER_NOTEBOOK)}
_COLORS = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b')


@dataclass
class DatasetJob:
    """One session's dataset run, resumable across script reruns: the loop picks up where it stopped."""
    run: StatsRun
    pending: Iterator[Union[NamedImage, Failure]]
    total: int  # inputs expected (zip members counted)
    batch_size: int
    batches: dict
    img_size: int
    rows_file: io.TextIOBase
    files: JobFiles  # the uploads on disk, re-read to show top examples
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    stopped: bool = False

    @property
    def seen(self) -> int:
        return self.run.images_done + len(self.run.failures)

    def csv_text(self) -> str:
        """The per-image CSV so far (the rows file is read back; memory holds no rows)."""
        position = self.rows_file.tell()
        self.rows_file.seek(0)
        text = self.rows_file.read()
        self.rows_file.seek(position)
        return text

    def step(self) -> bool:
        """Run one batch; False when there is nothing left."""
        items = list(itertools.islice(self.pending, self.batch_size))
        batch = [item for item in items if isinstance(item, NamedImage)]
        self.run.failures.extend(item for item in items if isinstance(item, Failure))
        if batch:
            self.run.add_batch(batch, self.batches)
        return bool(items)

    def time_left(self) -> Optional[float]:
        if not self.seen or self.seen >= self.total:
            return None
        return (time.monotonic() - self.started) / self.seen * (self.total - self.seen)


@dataclass
class FinishedJob:
    """A finished run loaded from its files: shown like a job, nothing recomputed but the examples drawn."""
    run: FinishedRun
    img_size: int  # the input size the examples are drawn at
    files: PathFiles = field(default_factory=PathFiles)
    finished: bool = True
    stopped: bool = False

    def csv_text(self) -> str:
        return self.run.rows_text


def _sources(uploads, use_samples: bool) -> List[Tuple[str, bytes]]:
    files = [(upload.name, upload.getvalue()) for upload in uploads or []]
    if use_samples:
        files.extend(sample_photo(label) for label in SAMPLE_PHOTOS)
    return files


def _start(settings: Settings, files: List[Tuple[str, bytes]], img_size: int, procedures, batch_size: int,
           top_k: int) -> None:
    models, batches = {}, {}
    for name in settings.models:
        try:
            models[name] = load_model(name, img_size, settings.device)
            for procedure in procedures:
                batches[name, procedure] = fitting_batch(name, img_size, batch_size, procedure,
                                                         device=zoo.resolve_device(settings.device))
        except (zoo.WeightsError, ImageError, memory.InsufficientMemory, ValueError, RuntimeError) as e:
            st.error(f'{name}: {e}')
            models.pop(name, None)
    if not models:
        return
    rows_file = tempfile.TemporaryFile('w+', newline='')
    run = StatsRun(models, rows_file, settings.thresholds, procedures, top_k=top_k)
    total = count_inputs(files)
    kept = JobFiles(files)  # on disk: the job reads each file when it runs it, and again to show an example
    job = DatasetJob(run, expand_uploads(kept.sources()), total, batch_size, batches, img_size, rows_file, kept)
    store().hold(job, sum(len(data) for _, data in files))  # Streamlit's uploader keeps the uploads in memory
    st.session_state.dataset_job = job


def _run(job: DatasetJob) -> None:
    """The resumable loop: a rerun (a widget, the Stop button) interrupts it between batches."""
    st.button('Stop', key='ds_stop', on_click=lambda: setattr(job, 'stopped', True))
    bar = st.progress(job.seen / max(1, job.total), text='starting...')
    while not job.stopped:
        if not job.step():
            job.finished = True
            break
        left = job.time_left()
        bar.progress(min(1.0, job.seen / max(1, job.total)),
                     text=f'{job.seen} of {job.total} images' + (f', about {left:.0f} s left' if left else ''))
    st.rerun()


def _band_chart(series, column: str, title: str, log: bool = False) -> go.Figure:
    """Mean over images with a min-max band. On a log axis an infinite value (a median |x| of 0 in some
    image) is drawn at the top edge and labelled, not dropped."""
    figure = go.Figure()
    values = [v for s in series for part in (s.low, s.mean, s.high) for v in part[column].tolist()]
    top = log_axis_top(values)

    def shown(numbers) -> list:
        return [on_log_axis(v, top) for v in numbers] if log else list(numbers)

    for i, s in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        label = s.model + ('' if s.procedure == REAL_FORWARD else f' ({s.procedure})')
        x = s.relative_depth.tolist()
        figure.add_trace(go.Scatter(x=x + x[::-1], y=shown(s.high[column].tolist() + s.low[column].tolist()[::-1]),
                                    fill='toself', fillcolor=color, opacity=0.2, line=dict(width=0),
                                    hoverinfo='skip', name=f'{label} min-max', showlegend=False))
        means = s.mean[column].tolist()
        figure.add_trace(go.Scatter(
            x=x, y=shown(means), mode='lines+markers+text' if log else 'lines+markers', line=dict(color=color),
            name=label, customdata=s.labels, hovertemplate='%{customdata}: %{y:.3g}<extra></extra>',
            text=['median 0' if log and math.isinf(v) else '' for v in means], textposition='bottom center'))
    figure.update_layout(title=title, xaxis_title='relative depth', yaxis_title=column, height=380,
                         yaxis_type='log' if log else 'linear')
    return figure


def _heatmap(job: DatasetJob, model: str, procedure: str) -> Tuple[go.Figure, List[Tuple[str, str]]]:
    layers = job.run.counter.layers(model, procedure)
    labels = [f'{counts.label} ({name})' for name, counts in layers]
    frequency = job.run.counter.frequency_matrix(model, procedure).numpy()  # (layers, channels), NaN padded
    figure = go.Figure(go.Heatmap(z=frequency, y=labels, colorscale='Reds', zmin=0, zmax=1,
                                  colorbar=dict(title='dead in'),
                                  hovertemplate='layer %{y}<br>channel %{x}<br>'
                                                'dead in %{z:.0%} of images<extra></extra>'))
    figure.update_layout(title=f'{model}: fraction of images in which each channel is dead',
                         height=max(400, 14 * len(labels)),
                         xaxis_title='channel', yaxis=dict(autorange='reversed'))
    return figure, [(name, counts.label) for name, counts in layers]


def _example_picture(job: DatasetJob, settings: Settings, model: str, procedure: str, layer_label: str,
                     channel: int, example: Example):
    """The example's image re-read from the job's files and run up to the layer: (picture, caption)."""
    image = job.files.image(example.image)
    result = model_result(image, f'dataset:{example.image}', model, job.img_size, settings.device,
                          settings.thresholds, procedure, [layer_label])
    layer, seen = result.capture.layers[0], result.seen_image()
    geometry = layer_geometry(load_model(model, job.img_size, settings.device).model, layer.name, layer.kind,
                              (layer.height, layer.width), (seen.height, seen.width), procedure)
    box = input_box(geometry, example.row, example.col, (seen.height, seen.width))
    picture = example_picture(seen, layer.fmap[channel].float(), box, EXAMPLE_SIDE)
    return picture, f'{example.image}: {example.value:.4g} at row {example.row}, col {example.col}'


def _top_examples(job: DatasetJob, settings: Settings, model: str, procedure: str, layer_name: str,
                  layer_label: str, channel: int) -> None:
    """The channel's top images as a strip: the box of its maximum on the image the model saw, that box
    enlarged, and the channel's map over the image."""
    if job.run.examples is None:
        st.info('This run kept no top examples (run `t2t-viz stats` with --top-examples, and load that file too).')
        return
    kept = job.run.examples.layer(model, job.run.model_weights[model], procedure, layer_name)
    counts = dict(job.run.counter.layers(model, procedure))[layer_name]
    examples = kept.examples(channel)
    st.markdown(f'**Top {len(examples)} images of {layer_label} channel {channel}** — dead in '
                f'{float(counts.frequency[channel]):.0%} of {counts.images} images; mean maximum '
                f'{kept.mean_maximum()[channel]:.4g}; top value {examples[0].value:.4g}' if examples else
                f'No image reached {layer_label} channel {channel}.')
    st.caption('Each column: the image the model saw (resized and centre-cropped) with the box of the '
               "channel's maximum (CNN: its receptive field; ViT: its patch; T2T-ViT: its soft-split "
               "support), that box enlarged, and the channel's map over the image.")
    pictures = []
    for column, example in zip(st.columns(max(1, len(examples))), examples):
        try:
            picture, caption = _example_picture(job, settings, model, procedure, layer_label, channel, example)
        except (memory.InsufficientMemory, ImageError, KeyError, ValueError, RuntimeError) as e:
            column.error(f'{example.image}: {e}')
            column.caption(f'{example.value:.4g} at row {example.row}, col {example.col}')
            continue
        pictures.append(picture)
        column.image(picture, caption=caption)
    if pictures:
        st.download_button('Download the strip (PNG)', data=lambda: png_bytes(side_by_side(pictures)),
                           file_name=f'{model}_{layer_label}_channel{channel}_top.png', mime='image/png',
                           key='ds_examples_png', on_click='ignore')
    st.markdown(f'**Most selective channels of {layer_label}** (top example furthest above the channel\'s '
                'mean maximum over images)')
    st.dataframe(pd.DataFrame(selective_channels(kept)), hide_index=True, key='ds_selective')


def _results(job: DatasetJob, settings: Settings) -> None:
    run = job.run
    st.success(f'{run.images_done} images through {len(run.model_weights)} model(s)'
               + (' (stopped)' if job.stopped and not job.finished else '')
               + (' (loaded from files)' if isinstance(job, FinishedJob) else ''))
    random = [name for name, label in run.model_weights.items() if label != 'trained']
    if random:
        st.warning(f'**Random weights**: {", ".join(random)} — their statistics are not meaningful. Fetch trained '
                   'weights in the sidebar, then run again.')
    if run.failures:
        with st.expander(f'{len(run.failures)} file(s) skipped', expanded=True):
            for failure in run.failures:
                st.markdown(f'- `{failure.name}`: {failure.reason}')
    downloads = st.columns(3)
    downloads[0].download_button('Download per-image CSV', data=job.csv_text, file_name='stats.csv', mime='text/csv',
                                 key='ds_csv', on_click='ignore')
    downloads[1].download_button('Download per-channel CSV', data=run.per_channel_csv, file_name='channels.csv',
                                 mime='text/csv', key='ds_channels', on_click='ignore')
    downloads[2].download_button('Download top examples CSV', data=run.top_examples_csv,
                                 file_name='top_examples.csv', mime='text/csv', key='ds_top', on_click='ignore')
    if not run.images_done:
        return
    series = depth_bands(run.aggregates.values())
    for column, title, log in (('dead_fraction', 'dead channels', False), ('flat_fraction', 'flat channels', False),
                               ('massive_fraction', 'massive channels', False),
                               ('max_abs_ratio', 'largest |x| / median |x|', True),
                               ('high_norm_fraction', 'high-norm tokens', False)):
        st.plotly_chart(_band_chart(series, column, f'{title}: mean over images, band from min to max', log),
                        key=f'ds_{column}', config=PLOT_CONFIG)
    choices = sorted({(a.model, a.procedure) for a in run.aggregates.values()})
    model, procedure = st.selectbox('Heatmap of', choices, format_func=lambda c: f'{c[0]} ({c[1]})', key='ds_model')
    figure, layers = _heatmap(job, model, procedure)
    if not layers:
        st.info('No per-channel counts for this model: load the run\'s per-channel CSV to see the heatmap.')
        return
    event = st.plotly_chart(figure, key='ds_heatmap', on_select='rerun', selection_mode='points', config=PLOT_CONFIG)
    points = getattr(getattr(event, 'selection', None), 'points', None) or []
    picks = st.columns(2)
    layer_index = picks[0].selectbox('Layer', range(len(layers)), format_func=lambda i: layers[i][1], key='ds_layer')
    channel = picks[1].number_input('Channel', 0, None, 0, key='ds_channel')
    if points:  # a click on the heatmap chooses the cell
        labels = [f'{label} ({name})' for name, label in layers]
        layer_index, channel = labels.index(points[0]['y']), int(points[0]['x'])
    name, label = layers[layer_index]
    channels = job.run.counter.layers(model, procedure)[layer_index][1]
    channel = min(channel, channels.dead_images.numel() - 1)
    _top_examples(job, settings, model, procedure, name, label, channel)


def page(settings: Settings) -> None:
    st.title('Dataset statistics')
    st.caption('Dead, flat and massive channels, massive activations and high-norm tokens over many images. Only '
               'statistics are kept, so memory does not grow with the number of images.')
    job: Optional[DatasetJob] = st.session_state.get('dataset_job')
    uploads = st.file_uploader('Images, or .zip files of images', accept_multiple_files=True, key='ds_files')
    controls = st.columns(5)
    use_samples = controls[0].checkbox('All bundled samples', key='ds_samples')
    img_size = controls[1].selectbox('Input size', DATASET_SIZES, key='ds_size')
    procedures = PROCEDURE_CHOICES[controls[2].selectbox('Procedure', list(PROCEDURE_CHOICES), key='ds_procedure')]
    batch_size = controls[3].number_input('Batch size', 1, 64, 8, key='ds_batch')
    top_k = controls[4].number_input('Top images per channel', 1, 32, DEFAULT_TOP_K, key='ds_top_k')
    with st.expander('Load a finished run (t2t-viz stats, Ray or merged shards) instead of running one'):
        files = st.columns(3)
        rows = files[0].file_uploader('Per-image CSV', type='csv', key='ds_load_rows')
        channels = files[1].file_uploader('Per-channel CSV', type='csv', key='ds_load_channels')
        top = files[2].file_uploader('Top examples CSV', type='csv', key='ds_load_top')
        if st.button('Load', key='ds_load', disabled=rows is None):
            try:
                finished = FinishedRun(*(upload.getvalue().decode() if upload else '' for upload in (rows, channels,
                                                                                                      top)))
            except (ValueError, KeyError, UnicodeDecodeError) as e:
                st.error(f'These files are not one run\'s statistics: {e}')
            else:
                job = st.session_state.dataset_job = FinishedJob(finished, img_size)
    running = job is not None and not job.finished and not job.stopped
    if st.button('Run', type='primary', key='ds_run', disabled=running or not (uploads or use_samples)):
        _start(settings, _sources(uploads, use_samples), img_size, procedures, int(batch_size), int(top_k))
        job = st.session_state.get('dataset_job')
        running = job is not None
    if job is None:
        st.info('Upload images (several files, or .zip files) or choose the bundled samples, then Run.')
        return
    if running:
        _run(job)
    _results(job, settings)
