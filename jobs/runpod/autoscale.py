"""The autoscaler: raises an endpoint's max workers when its queued jobs would wait longer than a target,
and lowers it when workers sit idle with nothing queued. Off unless RPQ_AUTOSCALE names the endpoint.

`decide` is pure: the policy (floor, ceiling, target wait) and what was seen now go in, a new max (or none,
with why) comes out. Three things keep it from flapping:
- it raises only on a long estimated wait and lowers only with an empty queue and idle workers, and no state
  satisfies both;
- it lowers one step at a time;
- after any change to the endpoint's workers, by anyone (the audit table says when), it waits
  `cooldown_seconds` before deciding again.

It never raises while the spend guard holds jobs, and never leaves [floor, ceiling]. Every change goes
through `jobs.runpod.scaling.scale_endpoint`, so it is read live first, sent with both min and max, read
back and audited with the actor "autoscaler".

The estimate of a queued job's wait is deliberately plain. The endpoint's jobs waiting for a worker (PENDING
in rpq and IN_QUEUE at RunPod) go through `max` workers at a time, each taking a typical run: the median
execution of its recent jobs.
"""

from __future__ import annotations

import logging
import math
import statistics
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from jobs.errors import RunPodError
from jobs.flow.spend_guard import spend_hold
from jobs.runpod.guard_workers import guard_workers
from jobs.runpod.health import recent_timings
from jobs.runpod.scaling import ScaleResult, scale_endpoint
from jobs.runtime import Runtime
from jobs.settings import AutoscalePolicy
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.locks import try_acquire
from jobs.storage.models import JobRow, ScaleChange, utcnow

log = logging.getLogger("rpq.autoscale")

ACTOR = "autoscaler"
#: Until an endpoint has a recent job to time, a run is assumed to take this long.
DEFAULT_RUN_SECONDS = 30.0


@dataclass(frozen=True)
class Seen:
    """What the autoscaler knows of an endpoint now."""

    max_workers: int
    min_workers: int
    waiting_jobs: int  # PENDING in rpq and IN_QUEUE at RunPod
    idle_workers: int
    typical_run_seconds: float
    seconds_since_change: float | None  # None: no change recorded
    spend_held: bool

    @property
    def estimated_wait(self) -> float:
        return math.ceil(self.waiting_jobs / max(self.max_workers, 1)) * self.typical_run_seconds


@dataclass(frozen=True)
class Decision:
    new_max: int | None
    why: str


def decide(policy: AutoscalePolicy, seen: Seen) -> Decision:
    """The autoscaler's one rule, pure. See the module's docstring for why it does not flap."""
    if seen.seconds_since_change is not None and seen.seconds_since_change < policy.cooldown_seconds:
        return Decision(None, f"cooling down: the workers changed {seen.seconds_since_change:.0f} s ago "
                              f"(waits {policy.cooldown_seconds:.0f} s)")
    if seen.max_workers < policy.floor:
        if seen.spend_held:  # the guard may have lowered it on purpose (RPQ_BUDGET_LOWER_WORKERS_TO)
            return Decision(None, f"max workers {seen.max_workers} is below the floor {policy.floor}, but the "
                                  "spend guard holds: not raising")
        return Decision(policy.floor, f"max workers {seen.max_workers} is below the floor {policy.floor}")
    if seen.max_workers > policy.ceiling:
        return Decision(policy.ceiling, f"max workers {seen.max_workers} is above the ceiling {policy.ceiling}")
    wait = seen.estimated_wait
    if seen.waiting_jobs and wait > policy.target_wait_seconds:
        if seen.spend_held:
            return Decision(None, f"queued jobs would wait ~{wait:.0f} s, but the spend guard holds: not raising")
        if seen.max_workers >= policy.ceiling:
            return Decision(None, f"queued jobs would wait ~{wait:.0f} s, but max workers is at the ceiling "
                                  f"{policy.ceiling}")
        # Enough workers for the queue to clear within the target, at least one more, at most the ceiling.
        needed = math.ceil(seen.waiting_jobs * seen.typical_run_seconds / policy.target_wait_seconds)
        new_max = min(policy.ceiling, max(seen.max_workers + 1, needed))
        return Decision(new_max, f"{seen.waiting_jobs} queued jobs would wait ~{wait:.0f} s, over the target "
                                 f"{policy.target_wait_seconds:.0f} s")
    if not seen.waiting_jobs and seen.idle_workers > 0 and seen.max_workers > policy.floor:
        return Decision(seen.max_workers - 1, f"nothing queued and {seen.idle_workers} worker(s) idle: one step down")
    return Decision(None, f"within target: {seen.waiting_jobs} queued, ~{wait:.0f} s wait, "
                          f"{seen.idle_workers} idle")


def observe(rt: Runtime, session: Session, endpoint_name: str) -> Seen:
    """What the autoscaler decides on: RunPod's live workers, rpq's table for the queue and the timings."""
    endpoint = rt.settings.endpoints[endpoint_name]
    config = rt.management.get_endpoint(endpoint.id)
    workers = rt.management.list_workers(endpoint.id)
    now = utcnow()
    waiting = session.exec(select(func.count()).select_from(JobRow).where(
        JobRow.endpoint_id == endpoint.id,
        col(JobRow.status).in_([JobStatus.PENDING, JobStatus.IN_QUEUE]))).one()
    executions, _delays = recent_timings(session, endpoint.id)
    last = session.exec(select(func.max(ScaleChange.at)).where(
        ScaleChange.endpoint_id == endpoint.id, col(ScaleChange.ok))).one()
    return Seen(
        max_workers=config.workers_max, min_workers=config.workers_min, waiting_jobs=int(waiting),
        idle_workers=workers.summary.idle,
        typical_run_seconds=statistics.median(executions) / 1000 if executions else DEFAULT_RUN_SECONDS,
        seconds_since_change=None if last is None else (now - last).total_seconds(),
        spend_held=spend_hold(session, rt.settings, now, endpoint.id) is not None)


def autoscale(rt: Runtime, *, skip: set[str] | None = None) -> dict[str, ScaleResult | str]:
    """One round over every endpoint RPQ_AUTOSCALE names (but those in `skip`, which the spend guard just
    changed): each decided, and changed when the decision says."""
    done: dict[str, ScaleResult | str] = {}
    for name, policy in sorted(rt.settings.autoscale.items()):
        if skip and name in skip:
            continue
        try:
            with session_scope(rt.engine, read_only=True) as session:
                seen = observe(rt, session, name)
        except RunPodError as exc:
            log.warning("autoscaler: endpoint %s not read (%s); nothing changed", name, exc)
            done[name] = f"not read: {exc}"
            continue
        decision = decide(policy, seen)
        if decision.new_max is None:
            done[name] = decision.why
            continue
        log.info("autoscaler: endpoint %s: %s; max workers %d -> %d", name, decision.why, seen.max_workers,
                 decision.new_max)
        # The floor is a max-workers floor: min stays as it is, unless it would exceed the new max.
        done[name] = scale_endpoint(rt, name, max=decision.new_max, actor=ACTOR, reason=decision.why,
                                    min=decision.new_max if seen.min_workers > decision.new_max else None)
    return done


def autoscale_on_schedule(rt: Runtime) -> dict[str, ScaleResult | str] | None:
    """Beat's round of changes to workers, held by a lease so two beats (or a backlog) do not both change them:
    first the spend guard's (which lowers held endpoints and puts back released ones), then the autoscaler's,
    which sees what the guard did as a recent change and waits out its cooldown."""
    if not rt.settings.autoscale and rt.settings.budget_lower_workers_to is None:
        return None
    lease = timedelta(seconds=rt.settings.runpod_health_poll_seconds * 0.8)
    if not try_acquire(rt.engine, "autoscale", owner=uuid.uuid4().hex, lease=lease):
        return None
    guarded = guard_workers(rt)
    changed = {name for name, what in guarded.items() if isinstance(what, ScaleResult)}
    return {**autoscale(rt, skip=changed), **guarded}
