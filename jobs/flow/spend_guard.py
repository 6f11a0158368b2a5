"""The spend guard: while the account spends faster than RPQ_BUDGET_MAX_SPEND_PER_HOUR, or its balance is at
or below RPQ_BUDGET_MIN_BALANCE, new jobs are held, not lost.

It reads the latest account snapshot the collectors stored (RunPod bills every 5 minutes, and the account
collector reads it as often). Held jobs stay PENDING with the reason in `Job.waiting`; the dispatcher looks
again every HOLD_RECHECK_SECONDS and sends them, in their usual order, once the limit clears. Jobs already at
RunPod go on: the guard decides what is sent, not what runs.

With no good snapshot (none yet, or only failed reads of the account) the guard cannot tell, and sends: a
guard that stopped all work whenever RunPod's GraphQL answered badly would cost more than it saves. A
snapshot older than STALE_AFTER collection intervals counts as none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from jobs.settings import Settings
from jobs.storage.models import AccountSnapshot

#: While holding, the dispatcher looks again this often.
HOLD_RECHECK_SECONDS = 30.0
#: A snapshot older than this many collection intervals is too old to hold work on.
STALE_AFTER = 3


@dataclass(frozen=True)
class SpendHold:
    """Why new jobs are held: a sentence, and the snapshot it rests on."""

    message: str
    observed_at: datetime


def spend_hold(session: Session, settings: Settings, now: datetime) -> SpendHold | None:
    """The hold in force now, or None (no limit set, no recent snapshot, or within the limits)."""
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
