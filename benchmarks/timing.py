"""Timing shared by the benchmarks: the compared functions run alternately, round after round."""
from __future__ import annotations

import time
from typing import Callable, List, Sequence


def round_times(functions: Sequence[Callable[[], object]], repeats: int) -> List[List[float]]:
    """Seconds per function and round; each round runs every function once, after an untimed warm-up round.

    Running them back to back in every round means a machine that gets slower or faster during the run
    affects all of them alike.
    """
    times: List[List[float]] = [[] for _ in functions]
    for round_index in range(repeats + 1):
        for function, samples in zip(functions, times):
            start = time.perf_counter()
            function()
            if round_index:
                samples.append(time.perf_counter() - start)
    return times
