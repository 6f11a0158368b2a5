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
from sqlalchemy import select as sa_select
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


# -- rpq cost: the estimates summed, beside what RunPod billed -------------------------------------------------


@dataclass(frozen=True)
class CostLine:
    """One group of `rpq cost`: finished jobs, their summed estimate, and RunPod's billed amount for the same
    hours where the grouping allows (by endpoint and by day; by status it cannot)."""

    group: str
    jobs: int
    estimated_usd: float
    jobs_without_price: int
    billed_usd: float | None

    def to_dict(self) -> dict[str, object]:
        return {"group": self.group, "jobs": self.jobs, "estimated_usd": round(self.estimated_usd, 6),
                "jobs_without_price": self.jobs_without_price,
                "billed_usd": None if self.billed_usd is None else round(self.billed_usd, 6)}


BY = ("endpoint", "status", "day")


def cost_report(session: Session, *, since: datetime, by: str = "endpoint") -> list[CostLine]:
    """Finished jobs since `since`, grouped `by` endpoint, status or day (UTC), with RunPod's billed amounts
    from the billing collector's hourly records (from the hour `since` falls in)."""
    from jobs.storage.models import BillingRecordRow, JobRow

    if by not in BY:
        raise ValueError(f"by: one of {', '.join(BY)}")
    estimated: dict[str, list[float | None]] = {}
    names: dict[str, str] = {}
    for endpoint_id, endpoint_name, status, finished_at, usd in session.execute(
            sa_select(col(JobRow.endpoint_id), col(JobRow.endpoint_name), col(JobRow.status), col(JobRow.finished_at),
                      col(JobRow.cost_usd)).where(col(JobRow.finished_at) >= since)):
        names[endpoint_id] = endpoint_name
        group = {"endpoint": endpoint_name, "status": str(status),
                 "day": finished_at.strftime("%Y-%m-%d") if finished_at else "-"}[by]
        estimated.setdefault(group, []).append(usd)
    billed: dict[str, float] = {}
    if by != "status":
        hour = since.replace(minute=0, second=0, microsecond=0)
        for record in session.exec(select(BillingRecordRow).where(col(BillingRecordRow.start) >= hour)):
            group = names.get(record.endpoint_id, record.endpoint_id) if by == "endpoint" \
                else record.start.strftime("%Y-%m-%d")
            billed[group] = billed.get(group, 0.0) + record.total_amount
    groups = sorted(set(estimated) | set(billed))
    return [CostLine(group, len(estimated.get(group, [])), sum(u for u in estimated.get(group, []) if u is not None),
                     sum(1 for u in estimated.get(group, []) if u is None),
                     None if by == "status" else billed.get(group, 0.0))
            for group in groups]
