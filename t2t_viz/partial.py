"""A run's partial statistics in one small file: what a resumed run, a shard or a merge needs besides the
per-image rows (those stream to their CSV).

The file is a NumPy ``.npz`` archive (no pickles), replaced atomically when it is saved:

* ``meta``: UTF-8 JSON: ``format`` ('t2t-viz-partial'), ``version`` (1), ``options`` (models, weights,
  procedures, thresholds, input size, top-k, MLP hidden: a merge or resume refuses other options),
  ``shard`` ([I, N]), ``inputs`` (inputs of this run, in order), ``inputs_done`` (inputs consumed, failures
  included), ``images_done``, ``rows_bytes`` (length of the per-image CSV when saved, header included),
  ``failures`` ([name, reason] pairs), ``names`` (image names the top examples refer to), and per
  model x procedure x layer: ``counters`` (label, kind, depth, images), ``examples`` (label, kind, depth,
  height, width, image_count) and ``aggregates`` (label, kind, depth, count, total, low, high);
* arrays ``dead_{i}`` (C,) int64 for counter i; ``values_{i}`` (C, k) float32, ``names_{i}`` (C, k) int32
  (index into ``names``, -1 when empty), ``positions_{i}`` (C, k) int64 and ``maximum_sum_{i}`` (C,)
  float64 for examples i.

Counts and top-k lists merge exactly (a merge equals one run over all inputs); the aggregates' sums merge up
to float rounding (they feed charts only).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .dataset import Failure, LayerAggregate, StatsRun
from .examples import ChannelExamples, TopExamples
from .stats import ChannelCounts, DeadChannelCounter

__all__ = ['Partial', 'save_partial', 'partial_bytes', 'load_partial', 'merge_partials', 'PartialError', 'FORMAT',
           'VERSION']

FORMAT, VERSION = 't2t-viz-partial', 1


class PartialError(ValueError):
    """A partial file that cannot be used here (unreadable, another format, other options)."""


@dataclass
class Partial:
    """Everything of a run but its per-image rows."""
    options: Dict[str, Any]
    counter: DeadChannelCounter
    examples: Optional[TopExamples]
    aggregates: Dict[Tuple[str, str, str], LayerAggregate]
    failures: List[Failure] = field(default_factory=list)
    images_done: int = 0
    inputs_done: int = 0
    inputs: List[str] = field(default_factory=list)
    shard: Tuple[int, int] = (1, 1)
    rows_bytes: int = 0

    @classmethod
    def of(cls, run: StatsRun, options: Dict[str, Any], inputs: Sequence[str], inputs_done: int,
           rows_bytes: int, shard: Tuple[int, int] = (1, 1)) -> 'Partial':
        return cls(options, run.counter, run.examples, run.aggregates, list(run.failures), run.images_done,
                   inputs_done, list(inputs), shard, rows_bytes)

    def restore(self, run: StatsRun) -> None:
        """Put this partial's statistics into a new run (to resume it)."""
        run.counter, run.examples, run.aggregates = self.counter, self.examples, self.aggregates
        run.failures, run.images_done = list(self.failures), self.images_done


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never a part."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.part')
    try:
        with os.fdopen(handle, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_partial(partial: Partial, path: os.PathLike) -> None:
    """Write the partial file, replacing any earlier one atomically."""
    _replace(Path(path), partial_bytes(partial))


def partial_bytes(partial: Partial) -> bytes:
    """The partial file's contents (what a remote worker sends back)."""
    names: Dict[str, int] = {}
    arrays: Dict[str, np.ndarray] = {}
    counters, examples, aggregates = [], [], []
    for i, (key, counts) in enumerate(partial.counter.items()):
        counters.append({'key': list(key), 'label': counts.label, 'kind': counts.kind, 'depth': counts.depth,
                         'images': counts.images})
        arrays[f'dead_{i}'] = counts.dead_images.numpy()
    for i, (key, layer) in enumerate(partial.examples.items() if partial.examples else ()):
        examples.append({'key': list(key), 'label': layer.label, 'kind': layer.kind, 'depth': layer.depth,
                         'height': layer.height, 'width': layer.width, 'image_count': layer.image_count})
        index = np.vectorize(lambda name: -1 if name == '' else names.setdefault(name, len(names)),
                             otypes=[np.int32])(layer.images) if layer.images.size else layer.images.astype(np.int32)
        arrays.update({f'values_{i}': layer.values, f'names_{i}': index, f'positions_{i}': layer.positions,
                       f'maximum_sum_{i}': layer.maximum_sum})
    for key, aggregate in partial.aggregates.items():
        aggregates.append({'key': list(key), 'label': aggregate.label, 'kind': aggregate.kind,
                           'depth': aggregate.depth, 'count': aggregate.count, 'total': aggregate.total,
                           'low': aggregate.low, 'high': aggregate.high})
    meta = {'format': FORMAT, 'version': VERSION, 'options': partial.options, 'shard': list(partial.shard),
            'inputs': partial.inputs, 'inputs_done': partial.inputs_done, 'images_done': partial.images_done,
            'rows_bytes': partial.rows_bytes, 'failures': [[f.name, f.reason] for f in partial.failures],
            'names': list(names), 'top_k': partial.examples.k if partial.examples else 0,
            'counters': counters, 'examples': examples, 'aggregates': aggregates}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    return buffer.getvalue()


def load_partial(path: Union[os.PathLike, str, bytes]) -> Partial:
    """A partial from its file, or from the bytes of one."""
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    if isinstance(path, bytes):
        path = 'partial bytes'
    try:
        with np.load(source, allow_pickle=False) as archive:
            meta = json.loads(archive['meta'].tobytes().decode())
            arrays = {name: archive[name] for name in archive.files if name != 'meta'}
    except (OSError, ValueError, KeyError) as e:
        raise PartialError(f'{path}: not a readable partial file ({e})') from e
    if meta.get('format') != FORMAT or meta.get('version') != VERSION:
        raise PartialError(f'{path}: not a {FORMAT} file of version {VERSION}')
    counter = DeadChannelCounter()
    for i, entry in enumerate(meta['counters']):
        counter.put(tuple(entry['key']), ChannelCounts(entry['label'], entry['kind'], entry['depth'],
                                                       torch.from_numpy(arrays[f'dead_{i}'].copy()), entry['images']))
    examples = TopExamples(meta['top_k']) if meta['top_k'] else None
    names = np.array(meta['names'] + [''], dtype=object)  # index -1 is the empty name
    for i, entry in enumerate(meta['examples']):
        values = arrays[f'values_{i}']
        layer = ChannelExamples(entry['label'], entry['kind'], entry['depth'], values.shape[0], entry['height'],
                                entry['width'], values.shape[1])
        layer.values, layer.positions = values.copy(), arrays[f'positions_{i}'].copy()
        layer.images = names[arrays[f'names_{i}']]
        layer.maximum_sum, layer.image_count = arrays[f'maximum_sum_{i}'].copy(), entry['image_count']
        examples.put(tuple(entry['key']), layer)
    aggregates = {}
    for entry in meta['aggregates']:
        model, procedure, layer = entry['key']
        aggregates[(model, procedure, layer)] = LayerAggregate(
            model, procedure, layer, entry['label'], entry['kind'], entry['depth'], entry['count'], entry['total'],
            entry['low'], entry['high'])
    return Partial(meta['options'], counter, examples, aggregates, [Failure(*f) for f in meta['failures']],
                   meta['images_done'], meta['inputs_done'], meta['inputs'], tuple(meta['shard']),
                   meta['rows_bytes'])


def merge_partials(partials: Sequence[Partial]) -> Partial:
    """One partial equal to a run over every input of ``partials`` (in their order): options must agree."""
    if not partials:
        raise PartialError('nothing to merge')
    first = partials[0]
    for other in partials[1:]:
        if other.options != first.options:
            raise PartialError(f'partials of different runs: {other.options} against {first.options}')
    merged = Partial(first.options, DeadChannelCounter(), TopExamples(first.examples.k) if first.examples else None,
                     {}, shard=(1, 1))
    for partial in partials:
        merged.counter.merge(partial.counter)
        if merged.examples is not None and partial.examples is not None:
            merged.examples.merge(partial.examples)
        for key, aggregate in partial.aggregates.items():
            mine = merged.aggregates.get(key)
            if mine is None:
                mine = merged.aggregates[key] = LayerAggregate(aggregate.model, aggregate.procedure, aggregate.layer,
                                                               aggregate.label, aggregate.kind, aggregate.depth)
            mine.merge(aggregate)
        merged.failures += partial.failures
        merged.images_done += partial.images_done
        merged.inputs_done += partial.inputs_done
        merged.inputs += partial.inputs
    return merged
