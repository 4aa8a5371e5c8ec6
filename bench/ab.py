"""A/B helpers for the bench scripts that compare one lowering switch on and off.

slimfx's lowering keeps each of its optional rewrites behind a module-level switch
(``cpu_schedules.ROW_REDUCTION``, ``cpu_schedules.RAGGED_ROWS``,
``workspace.PERSISTENT_WORKSPACE``, ...), so a bench can build the same model both ways
in one process and time the builds in alternating rounds: on a shared machine, only
side-by-side ratios mean something.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def switched(module: ModuleType, name: str, value) -> Iterator[None]:
    """``module.name = value`` inside the block, the old value restored after it."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def alternate(runs: dict[Hashable, Callable[[], float]], rounds: int) -> dict[Hashable, list[float]]:
    """Call every ``runs[key]()`` (one timing in ms) once per round, in the same order in
    every round; returns each key's timings."""
    times: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            times[key].append(run())
    return times


def median_and_min(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), min(times)
