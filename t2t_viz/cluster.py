"""``t2t-viz stats --ray``: the shards of a run as tasks of Ray actors, on one machine or a cluster.

Each actor loads the run's models once and turns a shard (a contiguous block of the inputs) into its
per-image rows and partial statistics (:mod:`t2t_viz.partial`); the driver writes the rows in input
order and merges the partials, so the files equal those of one process (byte for byte with batch size 1).
A worker that dies is replaced and its shard run again (reported in the terminal). Needs the optional
extra ``pip install "t2t-viz[ray]"``; every node needs this package and the weights files (or the network).
"""
from __future__ import annotations

import io
import logging
import os
import resource
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import zoo
from .allocator import batched_mmap_threshold, reuse_freed_memory
from .capture import REAL_FORWARD
from .dataset import StatsRun, fitting_batch
from .loading import prepared_batches, transforms_of
from .partial import Partial, load_partial, partial_bytes
from .stats import Thresholds

__all__ = ['RunSpec', 'ShardResult', 'run_shards', 'shard_blocks']

_logger = logging.getLogger(__name__)
RETRIES = 2  # times a shard is tried again after its worker died
MAX_AUTO_BATCH = 64


@dataclass(frozen=True)
class RunSpec:
    """What every worker needs to compute a shard exactly as the driver would."""
    models: Tuple[str, ...]
    checkpoints: Dict[str, str]
    img_size: Optional[int]
    device: str
    procedures: Tuple[str, ...] = (REAL_FORWARD,)
    mlp_hidden: bool = False
    thresholds: Thresholds = Thresholds()
    top_k: int = 0
    batch_size: int = 8  # 0: the largest that fits each worker's memory


@dataclass
class ShardResult:
    index: int
    rows: bytes  # the shard's per-image CSV rows, no header
    partial: Partial
    worker: str  # node id : process id
    peak_rss: int  # the worker process's peak resident memory so far, in bytes


def shard_blocks(inputs: Sequence[str], count: int) -> List[List[str]]:
    """``count`` contiguous blocks of the inputs, in order (some empty when there are fewer inputs)."""
    total = len(inputs)
    return [list(inputs[i * total // count:(i + 1) * total // count]) for i in range(count)]


def compute_shard(models: Dict[str, zoo.LoadedModel], spec: RunSpec, inputs: Sequence[str]
                  ) -> Tuple[bytes, Partial]:
    """One shard's rows and partial, in this process (what an actor runs)."""
    wanted = spec.batch_size or MAX_AUTO_BATCH  # 0: the largest that fits this worker's memory
    batches = {(name, procedure): fitting_batch(name, loaded.img_size, wanted, procedure, spec.mlp_hidden,
                                                device=loaded.device)
               for name, loaded in models.items() for procedure in spec.procedures}
    batch_size = spec.batch_size or min(batches.values())
    rows = io.StringIO()
    run = StatsRun(models, rows, spec.thresholds, spec.procedures, spec.mlp_hidden, top_k=spec.top_k, header=False)
    pin = any(loaded.device.type == 'cuda' for loaded in models.values())
    for batch in prepared_batches(inputs, transforms_of(models, spec.procedures), batch_size, 0, pin):
        run.failures.extend(batch.failures)
        run.add_batch(batch.images, batches, prepared=batch.inputs)
    options = {'models': {name: loaded.weights.label for name, loaded in models.items()}}
    return rows.getvalue().encode(), Partial.of(run, options, inputs, len(inputs), 0)


class _Worker:
    """A Ray actor: the run's models, loaded once, then shard after shard."""

    def __init__(self, spec: RunSpec):
        import ray
        cpus = int(ray.get_runtime_context().get_assigned_resources().get('CPU', 1)) or 1
        torch.set_num_threads(cpus)
        self.spec = spec
        self.models = {name: zoo.load(name, checkpoint=spec.checkpoints.get(name), img_size=spec.img_size,
                                      device=spec.device) for name in spec.models}
        reuse_freed_memory(batched_mmap_threshold(max(model.img_size for model in self.models.values())))

    def run(self, inputs: List[str]) -> Tuple[bytes, bytes, str, int]:
        import ray
        rows, partial = compute_shard(self.models, self.spec, inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return rows, partial_bytes(partial), f'{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}', peak


def run_shards(spec: RunSpec, inputs: Sequence[str], address: Optional[str], workers: Optional[int] = None,
               shards: Optional[int] = None, report: Callable[[str], None] = _logger.info
               ) -> Iterator[ShardResult]:
    """The run's shards computed by Ray actors, yielded in input order as they can be written.

    ``address``: a cluster's address ('auto' for the one this machine belongs to), or None to start a
    local one. ``workers``: actors (default: one per GPU when the run uses GPUs, else one per CPU);
    ``shards``: blocks of inputs (default four per worker, so a retried shard is a small part of the run).
    A worker that dies (killed, out of memory, its node lost) is replaced by a new one, which takes the
    shard again, at most ``RETRIES`` times per shard; each death is reported. Any other error ends the run.
    """
    import ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    environment = {key: value for key, value in os.environ.items() if key.startswith('T2T_VIZ_')}
    ray.init(address=address, runtime_env={'env_vars': environment}, logging_level=logging.WARNING,
             ignore_reinit_error=True, include_dashboard=False)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get('GPU', 0)) if spec.device != 'cpu' else 0
        count = workers or (gpus or max(1, int(resources.get('CPU', 1))))
        per_worker = {'num_gpus': 1} if gpus else {'num_cpus': max(1, int(resources.get('CPU', 1)) // count)}
        actor = ray.remote(max_restarts=0, max_task_retries=0, **per_worker)(_Worker)
        idle = [actor.remote(spec) for _ in range(count)]
        report(f'ray: {count} worker(s) on {len(ray.nodes())} node(s), '
               + ('one GPU each' if gpus else f'{per_worker["num_cpus"]} CPU(s) each'))
        blocks = shard_blocks(inputs, shards or 4 * count)
        waiting = deque(range(len(blocks)))
        retries = [0] * len(blocks)
        running: Dict[Any, Tuple[Any, int]] = {}  # task -> (its actor, its shard)
        finished: Dict[int, ShardResult] = {}
        next_shard = 0
        while next_shard < len(blocks):
            while idle and waiting:
                worker, index = idle.pop(), waiting.popleft()
                running[worker.run.remote(blocks[index])] = (worker, index)
            (task,), _ = ray.wait(list(running), num_returns=1)
            worker, index = running.pop(task)
            try:
                rows, partial, name, peak = ray.get(task)
            except (RayActorError, WorkerCrashedError) as error:
                retries[index] += 1
                if retries[index] > RETRIES:
                    raise RuntimeError(f'shard {index + 1} of {len(blocks)}: its worker died {retries[index]} '
                                       f'times ({type(error).__name__})') from error
                report(f'ray: a worker died during shard {index + 1} of {len(blocks)} ({type(error).__name__}); '
                       f'a new worker takes it again (retry {retries[index]} of {RETRIES})')
                ray.kill(worker)
                idle.append(actor.remote(spec))
                waiting.appendleft(index)
                continue
            idle.append(worker)
            finished[index] = ShardResult(index, rows, load_partial(partial), name, peak)
            while next_shard in finished:
                yield finished.pop(next_shard)
                next_shard += 1
    finally:
        ray.shutdown()
