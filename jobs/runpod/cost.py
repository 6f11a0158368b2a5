"""What a finished job cost, estimated: its execution time x its endpoint's GPU list price x GPU count.

The price comes from what the collectors stored: the endpoint's latest configuration (its GPU pools and
count) and the catalog's serverless price per GPU-hour for its first pool, the one RunPod tries first. It
is a list price: negotiated discounts, cold starts and idle workers kept warm are not in it, which is why
`rpq cost` sets these sums beside RunPod's billed amounts. With no price stored yet, a job's cost is None,
never zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from jobs.storage.models import EndpointSnapshot, GpuPrice

#: Prices change rarely (the collectors read them every few minutes): each process re-reads them this often.
CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class EndpointPrice:
    """The list price of one worker of an endpoint, per second of execution."""

    pool: str
    gpu_count: int
    per_gpu_hour: float
    observed_at: datetime

    @property
    def per_second(self) -> float:
        return self.per_gpu_hour * self.gpu_count / 3600


def estimate(execution_ms: int | None, price: EndpointPrice | None) -> float | None:
    """The job's cost in USD: None when its execution time or its endpoint's price is not known."""
    if execution_ms is None or price is None or execution_ms < 0:
        return None
    return round(execution_ms / 1000 * price.per_second, 8)


def latest_price(session: Session, endpoint_id: str) -> EndpointPrice | None:
    """The price from the endpoint's latest good snapshot and the latest catalog price of its first pool."""
    snapshot = session.exec(
        select(EndpointSnapshot).where(EndpointSnapshot.endpoint_id == endpoint_id, col(EndpointSnapshot.ok))
        .order_by(col(EndpointSnapshot.observed_at).desc()).limit(1)).first()
    if snapshot is None or not snapshot.gpu_pools:
        return None
    pool = snapshot.gpu_pools.split(",")[0].strip()
    gpu = session.exec(
        select(GpuPrice).where(GpuPrice.pool == pool, col(GpuPrice.serverless_per_hour).is_not(None))
        .order_by(col(GpuPrice.observed_at).desc()).limit(1)).first()
    if gpu is None or gpu.serverless_per_hour is None:
        return None
    return EndpointPrice(pool=pool, gpu_count=snapshot.gpu_count or 1, per_gpu_hour=gpu.serverless_per_hour,
                         observed_at=gpu.observed_at)


class PriceCache:
    """Per-process memory of `latest_price`, one entry per (engine, endpoint), kept CACHE_SECONDS. A failed
    read is not kept: that job's cost is None, and the next one reads again."""

    def __init__(self, *, ttl: float = CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._kept: dict[tuple[int, str], tuple[float, EndpointPrice | None]] = {}
        self._lock = threading.Lock()

    def get(self, engine: Engine, endpoint_id: str) -> EndpointPrice | None:
        key = (id(engine), endpoint_id)
        now = self._clock()
        with self._lock:
            kept = self._kept.get(key)
        if kept is not None and now - kept[0] < self.ttl:
            return kept[1]
        try:
            with Session(engine) as session:
                price = latest_price(session, endpoint_id)
        except SQLAlchemyError:
            return None
        with self._lock:
            self._kept[key] = (now, price)
        return price

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
