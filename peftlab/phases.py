"""Where a run's time went: seconds per phase, written into metrics.json as `phases_s` by the engine itself.

Phases (each absent when a run does not have it):
    data           loading, splitting, tokenising and batching the data
    model          loading the backbone, applying the strategy, preparing the output folder and the accelerator
    feature_cache  one frozen-backbone pass over train and validation (strategy `head`, peftlab.caching)
    train_steps    train() minus evaluation and checkpointing: the denominator of samples_per_s
    evaluation     the validation passes inside train()
    checkpointing  the checkpoints train() saves
    test           scoring the best weights on the test split
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

PHASES = ("data", "model", "feature_cache", "train_steps", "evaluation", "checkpointing", "test")


class PhaseTimer:
    """Seconds per named phase; a phase measured twice (data before and after the model loads) adds up."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def add(self, phase: str, seconds: float) -> None:
        """Count `seconds` towards `phase`; the next `lap` starts now."""
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Count the time since the timer last recorded anything (or was created) towards `phase`."""
        self.add(phase, time.perf_counter() - self._mark)

    @contextlib.contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        """Count the time spent inside the block towards `phase`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def as_dict(self) -> dict[str, float]:
        """{phase: seconds}, in PHASES order (any other phase after them), rounded to milliseconds."""
        order = [p for p in PHASES if p in self.seconds] + sorted(set(self.seconds) - set(PHASES))
        return {phase: round(self.seconds[phase], 3) for phase in order}
