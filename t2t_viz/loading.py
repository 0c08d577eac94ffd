"""Decoding and preprocessing in worker processes, so that the models never wait for images.

A ``torch.utils.data.DataLoader`` runs :class:`PreparedInputs` in ``workers`` processes: each input file is
decoded once and turned into the (3, H, W) input of every distinct transform of the run's models and
procedures (see :func:`t2t_viz.pipeline.input_transform`). Batches arrive in input order
(:class:`PreparedBatch`), with the unreadable files named as :class:`~t2t_viz.dataset.Failure`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Sequence, Tuple, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .dataset import Failure, NamedImage
from .images import ImageError, load_image
from .pipeline import input_transform
from .zoo import LoadedModel

__all__ = ['PreparedInputs', 'PreparedBatch', 'prepared_batches', 'transforms_of', 'default_workers']


def default_workers() -> int:
    """One process per core but one (left to the models), at most 8; none on a single core."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def transforms_of(models: Dict[str, LoadedModel], procedures: Sequence[str]
                  ) -> Dict[tuple, Callable[[Image.Image], torch.Tensor]]:
    """Every distinct transform the run needs, by key."""
    found = {}
    for loaded in models.values():
        for procedure in procedures:
            key, transform = input_transform(loaded, procedure)
            found.setdefault(key, transform)
    return found


class PreparedInputs(Dataset):
    """Input files, each decoded and prepared for every transform (a Failure when it cannot be read)."""

    def __init__(self, paths: Sequence[str], transforms: Dict[tuple, Callable[[Image.Image], torch.Tensor]]):
        self.paths, self.transforms = list(paths), transforms

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Union[Tuple[str, Dict[tuple, torch.Tensor]], Failure]:
        path = self.paths[index]
        try:
            image = load_image(path)
        except ImageError as e:
            return Failure(path, str(e))
        return path, {key: transform(image) for key, transform in self.transforms.items()}


@dataclass
class PreparedBatch:
    """One batch of inputs: the images read (names only), the failures, and per transform key the (B, 3, H, W)
    inputs of the images read, in order."""
    consumed: int  # inputs of the batch, failures included
    images: List[NamedImage]
    failures: List[Failure]
    inputs: Dict[tuple, torch.Tensor]


def _collate(items) -> dict:
    read = [item for item in items if not isinstance(item, Failure)]
    keys = read[0][1].keys() if read else ()
    return {'consumed': len(items), 'names': [path for path, _ in read],
            'failures': [item for item in items if isinstance(item, Failure)],
            'inputs': {key: torch.stack([inputs[key] for _, inputs in read]) for key in keys}}


def prepared_batches(paths: Sequence[str], transforms: Dict[tuple, Callable[[Image.Image], torch.Tensor]],
                     batch_size: int, workers: int, pin_memory: bool = False) -> Iterator[PreparedBatch]:
    """Batches of ``batch_size`` inputs, in input order, prepared by ``workers`` processes (0: in this one);
    ``pin_memory`` puts the inputs in page-locked memory for a CUDA device's asynchronous copies."""
    loader = DataLoader(PreparedInputs(paths, transforms), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                        prefetch_factor=2 if workers else None)
    for batch in loader:
        yield PreparedBatch(batch['consumed'], [NamedImage(name, None) for name in batch['names']],
                            batch['failures'], batch['inputs'])
