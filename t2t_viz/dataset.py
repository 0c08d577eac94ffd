"""Statistics over many images, reduced as they stream: the CLI's ``stats`` and the app's dataset mode.

Nothing of a capture is kept but its statistics: per-image CSV rows are written out as they come, and
in memory stay running aggregates per layer and, per model x layer x channel, the number of images in
which the channel was dead. Both the CLI and the app run :class:`StatsRun` batch by batch, so they write
byte-for-byte the same CSV for the same images and models.
"""
from __future__ import annotations

import csv
import io
import math
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np
import torch
from PIL import Image

from .capture import REAL_FORWARD
from .examples import ChannelExamples, TopExamples
from .images import IMAGE_EXTENSIONS, ImageError, load_image, preprocess_bytes
from . import memory
from .pipeline import ModelResult, input_transform, inspect_images, memory_estimate
from .stats import CSV_COLUMNS, PER_CHANNEL_COLUMNS, ChannelCounts, DeadChannelCounter, Thresholds, csv_text, write_csv
from .zoo import LoadedModel

__all__ = ['NamedImage', 'Failure', 'StatsRun', 'LayerAggregate', 'LayerSeries', 'expand_uploads', 'count_inputs',
           'depth_bands', 'fitting_batch', 'JobFiles', 'FinishedRun', 'PathFiles', 'add_to_aggregates',
           'AGGREGATED_COLUMNS', 'MAX_ZIP_MEMBERS']

MAX_ZIP_MEMBERS = 10_000  # a .zip with more members is refused as a possible zip bomb


@dataclass
class NamedImage:
    name: str
    image: Optional[Image.Image]  # None when the batch comes prepared (see StatsRun.add_batch)


@dataclass(frozen=True)
class Failure:
    name: str
    reason: str


def expand_uploads(files: Iterable[Tuple[str, bytes]]) -> Iterator[Union[NamedImage, Failure]]:
    """Decoded images from uploaded (name, bytes): image files as they are, ``.zip`` files member by member.

    A file that cannot be used becomes a :class:`Failure` naming it and the reason; the rest go on.
    Zip members that are not images by extension (folders, ``__MACOSX`` metadata) are skipped silently.
    """
    for name, data in files:
        if name.lower().endswith('.zip'):
            yield from _zip_members(name, data)
        else:
            yield _decode(name, data)


def _decode(name: str, data: bytes) -> Union[NamedImage, Failure]:
    try:
        return NamedImage(name, load_image(data, name=name))
    except ImageError as e:
        return Failure(name, str(e).removeprefix(f'{name}: '))


def _image_members(archive: zipfile.ZipFile) -> List[zipfile.ZipInfo]:
    """The members of a zip that are images by extension, without folders and hidden or macOS metadata."""
    members = []
    for member in archive.infolist():
        path = PurePosixPath(member.filename)
        if member.is_dir() or '__MACOSX' in path.parts or path.name.startswith('.'):
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            members.append(member)
    return sorted(members, key=lambda m: m.filename)


def _zip_members(name: str, data: bytes) -> Iterator[Union[NamedImage, Failure]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        yield Failure(name, f'not a readable zip file ({e})')
        return
    with archive:
        if len(archive.infolist()) > MAX_ZIP_MEMBERS:
            yield Failure(name, f'{len(archive.infolist())} files is over the limit of {MAX_ZIP_MEMBERS}')
            return
        for member in _image_members(archive):
            label = f'{name}/{member.filename}'
            try:
                yield _decode(label, archive.read(member))
            except (zipfile.BadZipFile, OSError, RuntimeError) as e:  # corrupt member, or encrypted
                yield Failure(label, f'cannot be read from the zip ({e})')


class JobFiles:
    """A dataset job's files, kept on disk (never in memory) while the job lives, and read back on demand:
    as (name, bytes) for :func:`expand_uploads`, or one image by the name it was given there (a zip member
    is read from its zip). The folder is removed when the object is closed or collected."""

    def __init__(self, files: Iterable[Tuple[str, bytes]]):
        self._folder = tempfile.TemporaryDirectory(prefix='t2t-viz-job-')
        self._paths: List[Tuple[str, Path]] = []  # (upload name, file on disk), in upload order
        for index, (name, data) in enumerate(files):
            path = Path(self._folder.name) / f'{index:06d}'
            path.write_bytes(data)
            self._paths.append((name, path))

    @property
    def disk_bytes(self) -> int:
        return sum(path.stat().st_size for _, path in self._paths)

    def sources(self) -> Iterator[Tuple[str, bytes]]:
        """Each file as (name, bytes), read one at a time."""
        for name, path in self._paths:
            yield name, path.read_bytes()

    def image(self, label: str) -> Image.Image:
        """The image :func:`expand_uploads` named ``label``, decoded again from the files on disk."""
        for name, path in self._paths:
            if name == label and not name.lower().endswith('.zip'):
                return load_image(path.read_bytes(), name=label)
        for name, path in self._paths:
            if name.lower().endswith('.zip') and label.startswith(name + '/'):
                with zipfile.ZipFile(path) as archive:
                    return load_image(archive.read(label[len(name) + 1:]), name=label)
        raise KeyError(f'no file {label!r} in this job')

    def close(self) -> None:
        self._folder.cleanup()


class PathFiles:
    """Images named by their paths (a finished CLI run's), read again when shown, if they are on this machine."""

    def image(self, label: str) -> Image.Image:
        if not Path(label).is_file():
            raise KeyError(f'{label} is not on this server')
        return load_image(label)


def count_inputs(files: Iterable[Tuple[str, bytes]]) -> int:
    """How many images (or failures) :func:`expand_uploads` will yield for these files."""
    total = 0
    for name, data in files:
        if not name.lower().endswith('.zip'):
            total += 1
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                total += 1 if len(archive.infolist()) > MAX_ZIP_MEMBERS else len(_image_members(archive))
        except zipfile.BadZipFile:
            total += 1
    return total


AGGREGATED_COLUMNS = ('dead_fraction', 'flat_fraction', 'massive_fraction', 'max_abs_ratio', 'high_norm_fraction')


@dataclass
class LayerAggregate:
    """Running mean, min and max over images of one model x procedure x layer's figures."""
    model: str
    procedure: str
    layer: str
    label: str
    kind: str
    depth: int
    count: int = 0
    total: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(AGGREGATED_COLUMNS, 0.0))
    low: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(AGGREGATED_COLUMNS, math.inf))
    high: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(AGGREGATED_COLUMNS, -math.inf))

    def add(self, row: dict) -> None:
        self.count += 1
        for column in AGGREGATED_COLUMNS:
            value = float(row[column])
            self.total[column] += value
            self.low[column] = min(self.low[column], value)
            self.high[column] = max(self.high[column], value)

    def mean(self, column: str) -> float:
        return self.total[column] / self.count if self.count else math.nan

    def merge(self, other: 'LayerAggregate') -> None:
        """Add another aggregate of the same layer over other images."""
        self.count += other.count
        for column in AGGREGATED_COLUMNS:
            self.total[column] += other.total[column]
            self.low[column] = min(self.low[column], other.low[column])
            self.high[column] = max(self.high[column], other.high[column])


def add_to_aggregates(aggregates: Dict[Tuple[str, str, str], LayerAggregate], row: Dict[str, object]) -> None:
    """Add one per-image CSV row (as written, or read back) to the aggregate of its model x procedure x layer."""
    key = (row['model'], row['procedure'], row['layer'])
    if key not in aggregates:
        aggregates[key] = LayerAggregate(*key, row['label'], row['kind'], int(row['depth']))
    aggregates[key].add(row)


class StatsRun:
    """Statistics of many images through several models, added one batch at a time.

    Rows go straight to ``out`` (a CSV file); what stays in memory does not grow with the number of
    images: per layer, running aggregates, and per channel, the count of images in which it was dead.
    """

    def __init__(self, models: Dict[str, LoadedModel], out: TextIO, thresholds: Thresholds = Thresholds(),
                 procedures: Sequence[str] = (REAL_FORWARD,), mlp_hidden: bool = False, top_k: int = 0,
                 header: bool = True):
        self.models, self.out, self.thresholds = models, out, thresholds
        self.procedures, self.mlp_hidden = tuple(procedures), mlp_hidden
        self.aggregates: Dict[Tuple[str, str, str], LayerAggregate] = {}
        self.counter = DeadChannelCounter()
        self.examples: Optional[TopExamples] = TopExamples(top_k) if top_k else None  # top images per channel
        self.failures: List[Failure] = []
        self.images_done = 0
        if header:  # a resumed run appends to rows that have one
            write_csv([], out)

    def add_batch(self, images: Sequence[NamedImage], batches: Optional[Dict[Tuple[str, str], int]] = None,
                  progress: Optional[Callable[[str, str], Callable[[int, int], None]]] = None,
                  prepared: Optional[Dict[tuple, torch.Tensor]] = None) -> None:
        """Run every model (and procedure) over ``images`` and write their rows.

        Rows are written in one order whatever the batch size: by image (in the order given), then model,
        procedure and depth. ``batches`` gives, per (model, procedure), how many images go through at once
        (default: all); ``progress(model, procedure)`` returns a layer-progress callback for each pass;
        ``prepared``: the images' (B, 3, H, W) inputs per transform key (see :mod:`t2t_viz.loading`).
        """
        if not images:  # a batch of unreadable files only
            return
        rows = [io.StringIO() for _ in images]  # each image's rows, written out once every model has run
        for name, loaded in self.models.items():
            for procedure in self.procedures:
                step = (batches or {}).get((name, procedure), len(images)) or 1
                if batches:  # the decoded images are in memory now: the passes must fit beside them
                    step = self._fitting_step(loaded, procedure, step, images)
                key = input_transform(loaded, procedure)[0]
                for first in range(0, len(images), step):
                    chunk = images[first:first + step]
                    floors = self.examples.floors(name, loaded.weights.label, procedure) if self.examples else None
                    inputs = None if prepared is None else prepared[key][first:first + step]  # (b, 3, H, W)
                    results = inspect_images(loaded, [item.image for item in chunk], self.thresholds,
                                             mlp_hidden=self.mlp_hidden, keep_maps=False, procedure=procedure,
                                             progress=progress(name, procedure) if progress else None,
                                             position_floors=floors, inputs=inputs)
                    for index, (item, result) in enumerate(zip(chunk, results), start=first):
                        self._add(item, result, rows[index])
        for text in rows:
            self.out.write(text.getvalue())
        self.images_done += len(images)

    def _fitting_step(self, loaded: LoadedModel, procedure: str, wanted: int, images: Sequence[NamedImage]) -> int:
        """The largest batch, at most ``wanted``, whose pass and the resizing of the largest image of
        ``images`` fit in the memory available now (images prepared elsewhere resize nothing here).
        InsufficientMemory when one image does not."""
        resizing = max(0 if item.image is None else preprocess_bytes(item.image, loaded.data_config)
                       for item in images)  # on the CPU
        if loaded.device.type == 'cpu':
            available = memory.available_bytes() - resizing
        else:
            largest = max(images, key=lambda i: 0 if i.image is None else i.image.width * i.image.height)
            memory.check_fits(resizing, f'resizing {largest.name}')
            available = memory.available_bytes(loaded.device)
        return fitting_batch(loaded.request, loaded.img_size, wanted, procedure, self.mlp_hidden, available)

    def _add(self, item: NamedImage, result: ModelResult, out: TextIO) -> None:
        rows = result.rows(item.name)
        write_csv(rows, out, header=False)
        for row, summary in zip(rows, result.summaries):
            add_to_aggregates(self.aggregates, row)
            self.counter.add(result.model, result.weights.label, summary, result.procedure)
        if self.examples is not None:
            self.examples.add(item.name, result.model, result.weights.label, result.summaries,
                              [layer.stats.max_positions for layer in result.capture.layers], result.procedure)

    @property
    def model_weights(self) -> Dict[str, str]:
        """Each model's weights label ('trained' or 'random')."""
        return {name: loaded.weights.label for name, loaded in self.models.items()}

    def per_channel_csv(self) -> str:
        return csv_text(self.counter.rows(), PER_CHANNEL_COLUMNS)

    def top_examples_csv(self) -> str:
        """Per model x procedure x layer x channel, its top images (TOP_EXAMPLE_COLUMNS); '' when not kept."""
        return self.examples.csv_text() if self.examples else ''


def fitting_batch(name: str, img_size: int, wanted: int, procedure: str = REAL_FORWARD, mlp_hidden: bool = False,
                  available: Optional[int] = None, device: Optional[str] = None) -> int:
    """The largest batch, at most ``wanted``, whose statistics-only pass fits in the memory available (on
    ``device``: a CUDA device's free memory).

    Raises InsufficientMemory when not even one image fits.
    """
    available = memory.available_bytes(device) if available is None else available
    batch = wanted
    while True:
        estimate = memory_estimate(name, img_size, batch, procedure, mlp_hidden=mlp_hidden, keep_maps=False)
        if estimate.peak <= available:
            return batch
        if batch == 1:
            raise memory.InsufficientMemory(
                f'{name} at {img_size}x{img_size} needs about {memory.format_bytes(estimate.peak)} for one image, '
                f'but only {memory.format_bytes(available)} of memory is available')
        batch = max(1, batch // 2)


@dataclass
class LayerSeries:
    """One model's figures across images, layer by layer: mean with a min-max band."""
    model: str
    procedure: str
    labels: List[str]
    relative_depth: np.ndarray  # (L,) in [0, 1]
    mean: Dict[str, np.ndarray]  # column -> (L,)
    low: Dict[str, np.ndarray]
    high: Dict[str, np.ndarray]


def depth_bands(aggregates: Iterable[LayerAggregate],
                kinds: Tuple[str, ...] = ('stem', 'relu', 'conv', 'block')) -> List[LayerSeries]:
    """Per model and procedure: each aggregated column's mean, min and max against relative depth."""
    grouped: Dict[Tuple[str, str], List[LayerAggregate]] = {}
    for aggregate in aggregates:
        if aggregate.kind in kinds:
            grouped.setdefault((aggregate.model, aggregate.procedure), []).append(aggregate)
    series = []
    for (model, procedure), layers in grouped.items():
        layers.sort(key=lambda a: a.depth)
        count = len(layers)
        series.append(LayerSeries(
            model, procedure, [a.label for a in layers], np.arange(count) / max(1, count - 1),
            {c: np.array([a.mean(c) for a in layers]) for c in AGGREGATED_COLUMNS},
            {c: np.array([a.low[c] for a in layers]) for c in AGGREGATED_COLUMNS},
            {c: np.array([a.high[c] for a in layers]) for c in AGGREGATED_COLUMNS}))
    return series


class FinishedRun:
    """A finished run read back from its files (per-image CSV, and optionally the per-channel and top-examples
    CSVs): the same aggregates, dead counts and top examples as the run that wrote them, without recomputing.
    Top-example values come back at the CSV's 6 significant digits."""

    def __init__(self, rows_text: str, per_channel_text: str = '', top_examples_text: str = ''):
        rows = list(csv.DictReader(io.StringIO(rows_text)))
        if rows and set(CSV_COLUMNS) - set(rows[0]):
            raise ValueError(f'not a per-image statistics CSV: no columns {sorted(set(CSV_COLUMNS) - set(rows[0]))}')
        self.rows_text, self.failures = rows_text, []
        self.aggregates: Dict[Tuple[str, str, str], LayerAggregate] = {}
        layers: Dict[Tuple[str, str, str], dict] = {}  # (model, procedure, layer) -> its first row
        for row in rows:
            layers.setdefault((row['model'], row['procedure'], row['layer']), row)
            add_to_aggregates(self.aggregates, row)
        self.images_done = len({row['image'] for row in rows})
        self.model_weights = {row['model']: row['weights'] for row in rows}
        self.counter = DeadChannelCounter()
        counted: Dict[Tuple[str, str, str, str], Tuple[dict, List[int]]] = {}  # key -> (first row, dead counts)
        for row in csv.DictReader(io.StringIO(per_channel_text)):
            key = (row['model'], row['weights'], row['procedure'], row['layer'])
            counted.setdefault(key, (row, []))[1].append(int(row['dead_images']))
        for key, (row, dead) in counted.items():
            label = layers.get((row['model'], row['procedure'], row['layer']), {}).get('label', row['layer'])
            self.counter.put(key, ChannelCounts(label, row['kind'], int(row['depth']),
                                                torch.tensor(dead, dtype=torch.long), int(row['images'])))
        self.examples: Optional[TopExamples] = None
        examples = list(csv.DictReader(io.StringIO(top_examples_text)))
        if examples:
            self.examples = TopExamples(max(int(row['rank']) for row in examples))
            kept_layers: Dict[Tuple[str, str, str, str], ChannelExamples] = {}
            for row in examples:
                first = layers[(row['model'], row['procedure'], row['layer'])]
                key = (row['model'], row['weights'], row['procedure'], row['layer'])
                kept = kept_layers.get(key)
                if kept is None:
                    kept = ChannelExamples(first['label'], first['kind'], int(first['depth']), int(first['channels']),
                                           int(first['height']), int(first['width']), self.examples.k)
                    self.examples.put(key, kept)
                    kept_layers[key] = kept
                channel, rank = int(row['channel']), int(row['rank']) - 1
                kept.values[channel, rank] = float(row['value'])
                kept.images[channel, rank] = row['image']
                kept.positions[channel, rank] = int(row['row']) * kept.width + int(row['col'])
        self._per_channel_text, self._top_examples_text = per_channel_text, top_examples_text

    def per_channel_csv(self) -> str:
        return self._per_channel_text

    def top_examples_csv(self) -> str:
        return self._top_examples_text
