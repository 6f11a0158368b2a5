"""The spend guard's hand on workers (RPQ_BUDGET_LOWER_WORKERS_TO, off by default).

Holding new jobs stops new work being sent, but an endpoint's workers still bill while they run what RunPod
already has, and while they sit idle until their idle timeout. With RPQ_BUDGET_LOWER_WORKERS_TO set, each
endpoint the guard holds also has its max workers (and min, if higher) lowered to that value, once per spell of
holding; when the hold clears, the guard puts back the values it found.

It goes through `jobs.runpod.scaling.scale_endpoint` like an operator's change (read live, min and max sent
together, read back, audited) with the actor "budget-guard". What the guard did is read back from that audit,
so nothing else needs storing: a "lower:" row since the spell began means this spell's lowering is done; the
latest "lower:" row with no "restore:" row after it is what to put back. It puts back only what is still as it
left it: if anyone changed the workers since (an operator, the autoscaler, RunPod's idle cut), their values
stand, and the guard says so instead.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlmodel import Session, col, select

from jobs.errors import RunPodError
from jobs.flow.spend_guard import ACCOUNT, note_holds, spend_holds
from jobs.runpod.scaling import ScaleResult, scale_endpoint
from jobs.runtime import Runtime
from jobs.storage.db import session_scope
from jobs.storage.models import ScaleChange, SpendHoldRow, utcnow

log = logging.getLogger("rpq.spend_guard")

ACTOR = "budget-guard"
LOWER = "lower: "
RESTORE = "restore: "


def guard_workers(rt: Runtime) -> dict[str, ScaleResult | str]:
    """One round over every configured endpoint: lower the workers of those held, put back those released."""
    to = rt.settings.budget_lower_workers_to
    if to is None:
        return {}
    done: dict[str, ScaleResult | str] = {}
    for name, endpoint in sorted(rt.settings.endpoints.items()):
        with session_scope(rt.engine) as session:
            now = utcnow()
            holds = spend_holds(session, rt.settings, now, endpoint.id)
            note_holds(session, {ACCOUNT, name}, holds, now)
            if holds:
                spell = _open_spell(session, holds[0].scope)
                due = spell is None or _last_lowering(session, endpoint.id, since=spell.started_at) is None
                restore = None
            else:
                due, restore = False, _to_restore(session, endpoint.id)
        if due:
            done[name] = _lower(rt, name, endpoint.id, to, holds[0].message)
        elif restore is not None:
            done[name] = _restore(rt, name, endpoint.id, restore)
    return done


def _lower(rt: Runtime, name: str, endpoint_id: str, to: int, why: str) -> ScaleResult | str:
    try:
        config = rt.management.get_endpoint(endpoint_id)
    except RunPodError as exc:
        return f"not read: {exc}"
    if config.workers_max <= to and config.workers_min <= to:
        return f"max workers {config.workers_max} is at or below {to} already"
    result = scale_endpoint(rt, name, max=min(to, config.workers_max), min=min(to, config.workers_min),
                            actor=ACTOR, reason=LOWER + why)
    log.warning("spend guard: endpoint %s: %s", name, result.message)
    return result


def _restore(rt: Runtime, name: str, endpoint_id: str, lowered: ScaleChange) -> ScaleResult | str:
    try:
        config = rt.management.get_endpoint(endpoint_id)
    except RunPodError as exc:
        return f"not read: {exc}"
    if (config.workers_min, config.workers_max) != (lowered.after_min, lowered.after_max):
        return (f"not put back: the workers are min {config.workers_min} max {config.workers_max} now, not the "
                f"min {lowered.after_min} max {lowered.after_max} the guard left; whoever changed them decides")
    result = scale_endpoint(rt, name, max=lowered.before_max, min=lowered.before_min, actor=ACTOR,
                            reason=RESTORE + "the spend guard no longer holds the endpoint's jobs")
    log.warning("spend guard: endpoint %s: %s", name, result.message)
    return result


def _open_spell(session: Session, scope: str) -> SpendHoldRow | None:
    return session.exec(select(SpendHoldRow).where(
        SpendHoldRow.scope == scope, col(SpendHoldRow.ended_at).is_(None))).first()


def _last_lowering(session: Session, endpoint_id: str, *, since: datetime | None = None) -> ScaleChange | None:
    """The guard's latest lowering of the endpoint (since `since`, if given) that RunPod took."""
    query = select(ScaleChange).where(ScaleChange.endpoint_id == endpoint_id, ScaleChange.actor == ACTOR,
                                      col(ScaleChange.ok), col(ScaleChange.reason).startswith(LOWER))
    if since is not None:
        query = query.where(col(ScaleChange.at) >= since)
    return session.exec(query.order_by(col(ScaleChange.at).desc()).limit(1)).first()


def _to_restore(session: Session, endpoint_id: str) -> ScaleChange | None:
    """The guard's latest lowering of the endpoint, if the guard has not put it back since (a put-back RunPod
    refused or did not answer is tried again next round)."""
    lowered = _last_lowering(session, endpoint_id)
    if lowered is None or lowered.before_max is None or lowered.before_min is None:
        return None
    restored = session.exec(select(ScaleChange.id).where(
        ScaleChange.endpoint_id == endpoint_id, ScaleChange.actor == ACTOR, col(ScaleChange.at) >= lowered.at,
        col(ScaleChange.ok), col(ScaleChange.reason).startswith(RESTORE))).first()
    return None if restored is not None else lowered
