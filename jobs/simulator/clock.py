"""The simulator's clock: real time plus an offset that tests (and operators) can move forward.

Everything time-based in the simulator (ttl, retention, idle timeout, cold starts, the default handler's
sleep, webhook retry spacing, rate-limit windows) reads this clock, so ``POST /_sim/clock/advance`` makes
an hour pass in an instant. Waiting is done with :class:`Signal`, which wakes sleepers both when the time
they wait for arrives and when the offset jumps.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime


class Signal:
    """A broadcast wake-up: every coroutine waiting when :meth:`fire` is called wakes once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None) -> None:
        """Return when fired or after ``timeout`` real seconds, whichever comes first."""
        event = self._event
        if timeout is not None and timeout <= 0:
            return
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass


class Clock:
    """Monotonic time for scheduling and wall time for timestamps, both shifted by ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.advanced = Signal()
        self._sleepers: dict[int, float] = {}
        self._next_sleeper_id = 0

    def now(self) -> float:
        """Seconds on the simulator's monotonic timeline; compare only with other ``now()`` values."""
        return time.monotonic() + self.offset

    def wall(self) -> float:
        return time.time() + self.offset

    def wall_at(self, moment: float) -> float:
        """The wall time (epoch seconds) of a ``now()`` reading."""
        return self.wall() - (self.now() - moment)

    def iso_at(self, moment: float | None) -> str | None:
        if moment is None:
            return None
        return datetime.fromtimestamp(self.wall_at(moment), UTC).isoformat().replace("+00:00", "Z")

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self.offset += seconds
        self.advanced.fire()

    def reset(self) -> None:
        self.offset = 0.0
        self.advanced.fire()

    def next_sleeper(self, after: float) -> float | None:
        """The earliest wake-up time of a :meth:`sleep` in progress that is later than ``after``."""
        return min((d for d in self._sleepers.values() if d > after), default=None)

    async def sleep_until(self, deadline: float) -> None:
        key = self._next_sleeper_id
        self._next_sleeper_id += 1
        self._sleepers[key] = deadline
        try:
            while (remaining := deadline - self.now()) > 0:
                await self.advanced.wait(remaining)
        finally:
            del self._sleepers[key]

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.now() + seconds)
