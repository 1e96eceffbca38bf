"""The batcher's batch-size cap: the configured batch size, lowered when a step runs out of memory.

Each out-of-memory step halves the cap to half the rows that step ran (at least one); after `recovery_s`
seconds without another, it doubles back, step by step, up to the batch size. `/health` and `/metrics`
report the current value, so an operator sees a worker that is running below its batch size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RECOVERY_S = 60.0  # long enough that a memory-hungry burst does not flap the cap every few steps


@dataclass
class BatchCap:
    limit: int  # the configured batch size: the cap never exceeds it
    recovery_s: float = RECOVERY_S
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    value: int = field(init=False)
    out_of_memory_steps: int = 0
    _lowered_at: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.value = self.limit

    def current(self) -> int:
        """The cap now; doubles back (once per recovery period) after a quiet `recovery_s`."""
        if self._lowered_at is not None and self.clock() - self._lowered_at >= self.recovery_s:
            self.value = min(self.limit, self.value * 2)
            self._lowered_at = self.clock() if self.value < self.limit else None
            log.info("no out-of-memory step for %.0fs: batch cap back up to %d of %d", self.recovery_s,
                     self.value, self.limit)
        return self.value

    def lower(self, rows: int) -> int:
        """A step with `rows` rows ran out of memory: the cap becomes half of them (at least 1)."""
        self.out_of_memory_steps += 1
        self.value = max(1, min(self.value, rows // 2))
        self._lowered_at = self.clock()
        return self.value
