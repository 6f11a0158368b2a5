"""Changing an endpoint's worker bounds at RunPod, safely: the one path for the operator's
`rpq endpoints scale` now, and for the autoscaler and the budget guard later.

`plan_scale` is pure: from a configuration just read, what would change and every reason not to.
`scale_endpoint` does the whole round: a fresh read, the plan, one PATCH (both min and max, never a
GraphQL `saveEndpoint`, which replaces the whole endpoint), a read back, and one row in `scale_audit`
whatever happened. The team's fact sheet (RunPod fidelity, §3.2) holds the sources.

Why the read comes first every time: RunPod changes scaling on its own (an idle endpoint drops to 2 max
workers after 3 days and 0 after 7; unhealthy endpoints are scaled down), so the "before" a change keeps
for its `min` is never one remembered from an earlier call.

A dry run reads and plans, and writes nothing: no PATCH and no audit row. The audit answers "who changed
this endpoint, and did it take"; a rehearsal changed nothing, and a row for it would read as an attempt
to anyone scanning `rpq endpoints audit` (the table has no column to say otherwise).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from jobs.errors import ChangeOutcomeUnknown, Problem, RunPodError, RunPodRejected
from jobs.runpod.management import IDLE_TIMEOUT_BOUNDS, EndpointConfig
from jobs.runtime import Runtime
from jobs.storage.db import session_scope
from jobs.storage.models import ScaleChange, utcnow

#: RunPod's cap on an account's total max workers by balance (docs: serverless/workers/overview).
BALANCE_TIERS = "5 by default; 10 at $100 balance; 20 at $200; 30 at $300; 40 at $500; 50 at $700; 60 at $900"
#: The highest tier: a max above it needs RunPod to have raised the account's limit.
HIGHEST_TIER = 60


@dataclass(frozen=True)
class Workers:
    """An endpoint's worker bounds. `idle_timeout` is None where RunPod has none (REQUEST_COUNT scaling)."""

    min: int
    max: int
    idle_timeout: int | None

    @classmethod
    def of(cls, config: EndpointConfig) -> Workers:
        return cls(config.workers_min, config.workers_max, config.idle_timeout)

    def __str__(self) -> str:
        idle = "-" if self.idle_timeout is None else f"{self.idle_timeout}s"
        return f"min {self.min}, max {self.max}, idle timeout {idle}"


@dataclass(frozen=True)
class ScalePlan:
    """What a change would do to `before`. `after` is what would be sent (both min and max always);
    `changes` names the fields that differ. Any problem refuses the whole plan: constraint "range" or
    "scaling" for a value RunPod would refuse, "required" when nothing was asked, "unchanged" when the
    values asked are the endpoint's already. `notes` explain what RunPod itself may do with the values."""

    before: Workers
    after: Workers
    changes: tuple[str, ...]
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def plan_scale(current: EndpointConfig, *, max: int | None = None, min: int | None = None,
               idle_timeout: int | None = None) -> ScalePlan:
    """The change from `current` (a configuration just read from RunPod) to the values given; None keeps
    a value as it is. Every problem is listed at once, none of them quoting more than the numbers."""
    before = Workers.of(current)
    problems: list[Problem] = []
    for label, value in (("max", max), ("min", min)):
        if value is not None and (not _whole(value) or value < 0):
            problems.append(Problem(label, "range", "must be a whole number >= 0"))
    low, high = IDLE_TIMEOUT_BOUNDS
    if idle_timeout is not None:
        if current.scaling_type == "REQUEST_COUNT":
            problems.append(Problem("idle_timeout", "scaling",
                                    "RunPod takes no idle timeout for an endpoint that scales on REQUEST_COUNT"))
        elif not _whole(idle_timeout) or not low <= idle_timeout <= high:
            problems.append(Problem("idle_timeout", "range", f"must be whole seconds from {low} to {high}"))
    new_min = before.min if min is None else min
    new_max = before.max if max is None else max
    if _whole(new_min) and _whole(new_max) and new_min >= 0 and new_max >= 0 and new_min > new_max:
        # Name what the operator did not give: "--max 1" on an endpoint with min 2 is refused because of min 2.
        kept = " (its current value)" if min is None else ""
        problems.append(Problem("min", "range", f"min {new_min}{kept} must not be more than max {new_max}"))
    after = Workers(new_min, new_max, before.idle_timeout if idle_timeout is None else idle_timeout)
    changes = tuple(name for name in ("min", "max", "idle_timeout") if getattr(after, name) != getattr(before, name))
    if max is None and min is None and idle_timeout is None:
        problems.append(Problem("workers", "required", "nothing asked: give max, min or idle timeout"))
    elif not problems and not changes:
        problems.append(Problem("workers", "unchanged", f"nothing to change: the endpoint has {before} already"))
    return ScalePlan(before=before, after=after, changes=changes, problems=tuple(problems),
                     notes=tuple(_notes(before, after)) if not problems else ())


def _notes(before: Workers, after: Workers) -> list[str]:
    """What RunPod itself does with these values, said before the change rather than discovered after."""
    notes: list[str] = []
    if after.max > before.max:
        notes.append(f"RunPod caps an account's total max workers (over all its endpoints) by balance: "
                     f"{BALANCE_TIERS}. A raise past the cap may be refused.")
        if after.max > HIGHEST_TIER:
            notes.append(f"max {after.max} is above {HIGHEST_TIER}, RunPod's highest balance tier: only an account "
                         "whose limit RunPod raised can have it.")
        notes.append("RunPod lowers an idle endpoint's max workers to 2 after 3 days without work and to 0 after 7, "
                     "and leaves it there: a raise does not last through a long idle spell.")
    if after.min > before.min:
        notes.append(f"min {after.min}: that many workers stay up and are billed even with nothing to do.")
    if after.max == 0:
        notes.append("max 0: no worker runs, so the endpoint's jobs wait until max is raised again.")
    return notes


class Outcome(enum.StrEnum):
    CHANGED = "changed"            # RunPod shows what was asked
    NOT_AS_ASKED = "not_as_asked"  # RunPod took the PATCH but shows other values (it may cap)
    REFUSED = "refused"            # rpq refused the values; nothing sent
    FAILED = "failed"              # RunPod refused the change, or could not be read or reached
    UNKNOWN = "unknown"            # the PATCH's answer was lost: it may or may not have been applied
    DRY_RUN = "dry_run"            # planned only; nothing sent, nothing audited
    DECLINED = "declined"          # the confirmation said no; nothing sent, nothing audited


@dataclass(frozen=True)
class ScaleResult:
    """What `scale_endpoint` did. `after` is what RunPod showed once the change was sent (None if never
    seen); `message` is a sentence for people; `audit_id` the `scale_audit` row (None for a dry run)."""

    endpoint_name: str
    endpoint_id: str
    outcome: Outcome
    message: str
    plan: ScalePlan | None
    after: Workers | None = None
    audit_id: int | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.CHANGED, Outcome.DRY_RUN)


def scale_endpoint(rt: Runtime, endpoint_name: str, *, max: int | None = None,
                   min: int | None = None, idle_timeout: int | None = None, actor: str,
                   reason: str | None = None, dry_run: bool = False,
                   confirm: Callable[[ScalePlan], bool] | None = None) -> ScaleResult:
    """Read the endpoint's live configuration, plan, PATCH what changes, read it back, audit it.

    Never raises for what RunPod does: every outcome comes back as a `ScaleResult` and (except a dry run)
    one `scale_audit` row. A dry run reads and plans, and is never audited, even when it is refused.
    `confirm` (an operator's yes or no) sees the plan made from the very read the PATCH is built on, so
    what was shown is what is sent; a no is not audited either, since nothing was attempted. An unknown
    endpoint name raises ConfigError before anything is sent or written.
    """
    target = rt.settings.resolve_endpoint(endpoint_name)
    # The values as given: None is "keep", and the audit shows that.
    audit: dict[str, Any] = {"endpoint_name": target.name, "endpoint_id": target.id, "actor": actor[:128],
                             "reason": reason, "asked_min": min, "asked_max": max, "asked_idle_timeout": idle_timeout}

    def result(outcome: Outcome, message: str, plan: ScalePlan | None, after: Workers | None = None,
               notes: tuple[str, ...] = ()) -> ScaleResult:
        ok = outcome is Outcome.CHANGED
        row_id = None if dry_run or outcome is Outcome.DECLINED else _record(rt, audit, plan, after, ok=ok,
                                                                 error=None if ok else message)
        return ScaleResult(target.name, target.id, outcome, message, plan, after, row_id, notes)

    management = rt.management
    try:
        current = management.get_endpoint(target.id)
    except RunPodError as exc:
        return result(Outcome.FAILED, f"could not read the endpoint's configuration: {exc}", None)
    plan = plan_scale(current, max=max, min=min, idle_timeout=idle_timeout)
    if plan.problems:
        said = "; ".join(str(p) for p in plan.problems)
        return result(Outcome.REFUSED, f"refused, nothing sent: {said}", plan)
    if dry_run:
        return result(Outcome.DRY_RUN, f"dry run: would change {plan.before} to {plan.after}; nothing sent", plan,
                      notes=plan.notes)
    if confirm is not None and not confirm(plan):
        return result(Outcome.DECLINED, "not confirmed; nothing sent", plan)
    # Only a value that changes is sent, but min and max always both (a fresh read's, for the one not asked).
    send_idle = plan.after.idle_timeout if "idle_timeout" in plan.changes else None
    try:
        answered = management.update_workers(target.id, min=plan.after.min, max=plan.after.max,
                                             idle_timeout=send_idle)
    except ChangeOutcomeUnknown as exc:
        return result(Outcome.UNKNOWN, f"outcome unknown: {exc}. The change may or may not have been applied: "
                                       "read the endpoint back (--dry-run shows its live values) before sending "
                                       "it again", plan, notes=plan.notes)
    except RunPodRejected as exc:
        return result(Outcome.FAILED, f"RunPod refused the change, nothing changed: {exc}", plan, notes=plan.notes)
    except RunPodError as exc:
        return result(Outcome.FAILED, f"the change was not made: {exc}", plan, notes=plan.notes)
    notes = plan.notes
    try:
        seen = Workers.of(management.get_endpoint(target.id))
    except RunPodError as exc:
        # The PATCH's own answer is RunPod's full endpoint after the change: good evidence, said to be such.
        seen = Workers.of(answered)
        notes = (*notes, f"the read back failed ({exc}); 'after' is RunPod's answer to the change itself")
    if seen != plan.after:
        return result(Outcome.NOT_AS_ASKED, f"RunPod took the change but shows {seen}, not the {plan.after} asked: "
                                            "RunPod may cap max workers (balance tier) or have changed it since",
                      plan, seen, notes)
    return result(Outcome.CHANGED, f"changed {plan.before} to {seen}", plan, seen, notes)


def _record(rt: Runtime, audit: dict[str, Any], plan: ScalePlan | None, after: Workers | None, *, ok: bool,
            error: str | None) -> int:
    row = ScaleChange(
        **audit,
        before_min=plan.before.min if plan else None,
        before_max=plan.before.max if plan else None,
        before_idle_timeout=plan.before.idle_timeout if plan else None,
        after_min=after.min if after else None,
        after_max=after.max if after else None,
        after_idle_timeout=after.idle_timeout if after else None,
        ok=ok,
        error=error,
        at=utcnow(),
    )
    with session_scope(rt.engine) as session:
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id


def recent_changes(session: Session, endpoint_name: str | None = None, *, limit: int = 50) -> list[ScaleChange]:
    """The latest scale changes, newest first, of one endpoint or all."""
    query = select(ScaleChange)
    if endpoint_name is not None:
        query = query.where(ScaleChange.endpoint_name == endpoint_name)
    return list(session.exec(query.order_by(col(ScaleChange.at).desc(), col(ScaleChange.id).desc()).limit(limit)))
