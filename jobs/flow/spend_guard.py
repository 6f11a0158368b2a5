"""The spend guard: new jobs are held, not lost, while the account spends faster than
RPQ_BUDGET_MAX_SPEND_PER_HOUR or its balance is at or below RPQ_BUDGET_MIN_BALANCE, and an endpoint's new jobs
while that endpoint spends faster than its RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR.

The account limits read the latest account snapshot the collectors stored (RunPod bills every 5 minutes, and
the account collector reads it as often). An endpoint's spend is the larger of two readings, since each misses
something: rpq's own estimate for the endpoint's jobs that finished in the last hour (immediate, but list price
and execution time only) and RunPod's billed amount for the endpoint's latest billed hour (idle and starting
workers included, but up to an hour late).

Held jobs stay PENDING with the reason in `Job.waiting`; the dispatcher looks again every HOLD_RECHECK_SECONDS
and sends them, in their usual order, once the limit clears. Jobs already at RunPod go on: the guard decides
what is sent, not what runs (unless RPQ_BUDGET_LOWER_WORKERS_TO asks it to lower max workers too). Each spell
of holding is a `spend_holds` row, begun and ended by the dispatchers that see it.

With no good snapshot (none yet, or only failed reads of the account) the guard cannot tell, and sends: a
guard that stopped all work whenever RunPod's GraphQL answered badly would cost more than it saves. A
snapshot older than STALE_AFTER collection intervals counts as none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from jobs.settings import Settings
from jobs.states import TERMINAL
from jobs.storage.models import AccountSnapshot, BillingRecordRow, JobRow, SpendHoldRow

log = logging.getLogger("rpq.spend_guard")

#: While holding, the dispatcher looks again this often.
HOLD_RECHECK_SECONDS = 30.0
#: A snapshot older than this many collection intervals is too old to hold work on.
STALE_AFTER = 3
#: The scope of the account-wide limits in `spend_holds` (an endpoint's own limit uses the endpoint's name).
ACCOUNT = "account"
#: A billed hour older than this (by its end) no longer says what the endpoint spends now.
BILLED_HOUR_FRESH = timedelta(hours=2)


@dataclass(frozen=True)
class SpendHold:
    """Why new jobs are held: a sentence, what it holds (ACCOUNT or an endpoint name), and when it was seen."""

    message: str
    observed_at: datetime
    scope: str = ACCOUNT


def spend_hold(session: Session, settings: Settings, now: datetime,
               endpoint_id: str | None = None) -> SpendHold | None:
    """The hold in force now for the endpoint's new jobs (the account's alone when `endpoint_id` is None),
    or None: no limit set, no recent reading, or within the limits."""
    holds = spend_holds(session, settings, now, endpoint_id)
    return holds[0] if holds else None


def spend_holds(session: Session, settings: Settings, now: datetime,
                endpoint_id: str | None = None) -> list[SpendHold]:
    """Every hold in force for the endpoint's new jobs: the account's first, then the endpoint's own."""
    holds = [_account_hold(session, settings, now)]
    if endpoint_id is not None:
        holds.append(endpoint_hold(session, settings, now, endpoint_id))
    return [hold for hold in holds if hold is not None]


def endpoint_hold(session: Session, settings: Settings, now: datetime, endpoint_id: str) -> SpendHold | None:
    """The hold of the endpoint's own limit alone (RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR), or None."""
    name = settings.endpoint_name_for(endpoint_id)
    ceiling = settings.budget_endpoint_max_spend_per_hour.get(name) if name is not None else None
    if name is None or ceiling is None:
        return None
    spend, how = endpoint_spend(session, endpoint_id, now)
    if spend < ceiling:
        return None
    return SpendHold(f"held by the spend guard: endpoint {name} spends ${spend:.2f}/h ({how}), at or over its "
                     f"RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR ${ceiling:.2f}/h", now, name)


def _account_hold(session: Session, settings: Settings, now: datetime) -> SpendHold | None:
    ceiling, floor = settings.budget_max_spend_per_hour, settings.budget_min_balance
    if ceiling is None and floor is None:
        return None
    fresh_after = now - timedelta(seconds=STALE_AFTER * settings.runpod_collection_interval_seconds)
    snapshot = session.exec(
        select(AccountSnapshot).where(col(AccountSnapshot.ok), col(AccountSnapshot.observed_at) >= fresh_after)
        .order_by(col(AccountSnapshot.observed_at).desc()).limit(1)).first()
    if snapshot is None:
        return None
    age = f"as of {snapshot.observed_at:%H:%M:%S} UTC"
    if ceiling is not None and snapshot.spend_per_hour is not None and snapshot.spend_per_hour >= ceiling:
        return SpendHold(f"held by the spend guard: the account spends ${snapshot.spend_per_hour:.2f}/h, at or "
                         f"over RPQ_BUDGET_MAX_SPEND_PER_HOUR ${ceiling:.2f}/h ({age})", snapshot.observed_at)
    if floor is not None and snapshot.balance is not None and snapshot.balance <= floor:
        return SpendHold(f"held by the spend guard: the balance is ${snapshot.balance:.2f}, at or below "
                         f"RPQ_BUDGET_MIN_BALANCE ${floor:.2f} ({age})", snapshot.observed_at)
    return None


def endpoint_spend(session: Session, endpoint_id: str, now: datetime) -> tuple[float, str]:
    """What the endpoint spends an hour, in USD, and which reading says so: the larger of rpq's estimate for its
    jobs finished in the last hour and RunPod's bill for its latest billed hour that ended."""
    estimated = session.exec(select(func.sum(JobRow.cost_usd)).where(
        JobRow.endpoint_id == endpoint_id, col(JobRow.status).in_(sorted(TERMINAL)),
        col(JobRow.finished_at) >= now - timedelta(hours=1))).one() or 0.0
    billed = session.exec(select(BillingRecordRow.total_amount).where(
        BillingRecordRow.endpoint_id == endpoint_id, col(BillingRecordRow.end) <= now,
        col(BillingRecordRow.end) > now - BILLED_HOUR_FRESH)
        .order_by(col(BillingRecordRow.end).desc()).limit(1)).first()
    if billed is not None and billed > estimated:
        return billed, "RunPod's bill for its last billed hour"
    return estimated, "rpq's estimate for its jobs finished in the last hour, at list price"


def note_holds(session: Session, scopes: set[str], holds: list[SpendHold], now: datetime) -> None:
    """Begin a `spend_holds` spell for each hold not yet recorded, and end the open spells of `scopes` that no
    longer hold. A dispatcher calls it with the scopes it looked at: the account's, and its endpoint's."""
    held = {hold.scope: hold for hold in holds}
    ended = [scope for scope in scopes if scope not in held]
    if ended:
        closed = session.execute(update(SpendHoldRow).where(
            col(SpendHoldRow.scope).in_(ended), col(SpendHoldRow.ended_at).is_(None)).values(ended_at=now))
        if closed.rowcount:  # type: ignore[attr-defined]
            log.warning("spend guard: no longer holding %s", ", ".join(sorted(ended)))
    if not held:
        return
    open_now = set(session.exec(select(SpendHoldRow.scope).where(
        col(SpendHoldRow.scope).in_(list(held)), col(SpendHoldRow.ended_at).is_(None))).all())
    for scope, hold in held.items():
        if scope in open_now:
            continue
        try:
            with session.begin_nested():  # another dispatcher may record the same spell first: that is fine
                session.add(SpendHoldRow(scope=scope, started_at=now, reason=hold.message))
        except IntegrityError:
            continue
        log.warning("spend guard: started holding %s: %s", scope, hold.message)


def recent_holds(session: Session, *, since: datetime) -> list[SpendHoldRow]:
    """The spells still open and those that ended after `since`, newest first."""
    return list(session.exec(select(SpendHoldRow).where(
        (col(SpendHoldRow.ended_at).is_(None)) | (col(SpendHoldRow.ended_at) >= since))
        .order_by(col(SpendHoldRow.started_at).desc())).all())
