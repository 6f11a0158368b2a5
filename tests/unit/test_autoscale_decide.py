"""The autoscaler's rule, as a pure function: when it raises, when it lowers, and why it does not flap."""

from __future__ import annotations

from dataclasses import replace

from jobs.runpod.autoscale import Seen, decide
from jobs.settings import AutoscalePolicy

POLICY = AutoscalePolicy(floor=1, ceiling=8, target_wait_seconds=60, cooldown_seconds=300)
CALM = Seen(max_workers=2, min_workers=0, waiting_jobs=0, idle_workers=0, typical_run_seconds=30,
            seconds_since_change=None, spend_held=False)


def test_a_queue_that_would_wait_past_the_target_raises_max_to_clear_it_within_the_target() -> None:
    decision = decide(POLICY, replace(CALM, waiting_jobs=10))  # 10 jobs over 2 workers: ~150 s

    assert decision.new_max == 5  # 10 jobs x 30 s within 60 s
    assert "over the target" in decision.why


def test_a_raise_stops_at_the_ceiling_and_not_at_all_while_the_spend_guard_holds() -> None:
    assert decide(POLICY, replace(CALM, waiting_jobs=100)).new_max == 8
    assert decide(POLICY, replace(CALM, waiting_jobs=100, max_workers=8)).new_max is None
    held = decide(POLICY, replace(CALM, waiting_jobs=100, spend_held=True))
    assert held.new_max is None and "spend guard" in held.why


def test_idle_workers_with_nothing_queued_lower_max_one_step_but_never_below_the_floor() -> None:
    assert decide(POLICY, replace(CALM, max_workers=5, idle_workers=3)).new_max == 4
    assert decide(POLICY, replace(CALM, max_workers=1, idle_workers=1)).new_max is None


def test_a_change_within_the_cooldown_is_not_followed_by_another() -> None:
    decision = decide(POLICY, replace(CALM, waiting_jobs=100, seconds_since_change=120))

    assert decision.new_max is None and "cooling down" in decision.why


def test_a_max_outside_the_bounds_is_brought_back_in() -> None:
    assert decide(POLICY, replace(CALM, max_workers=0)).new_max == 1
    assert decide(POLICY, replace(CALM, max_workers=12)).new_max == 8


def test_a_max_below_the_floor_stays_there_while_the_spend_guard_holds() -> None:
    # The guard may have lowered it on purpose (RPQ_BUDGET_LOWER_WORKERS_TO); raising it would undo that.
    held = decide(POLICY, replace(CALM, max_workers=0, spend_held=True))

    assert held.new_max is None and "spend guard" in held.why


def test_a_queue_hovering_around_the_target_does_not_make_it_flap() -> None:
    # Every 30 s for an hour the queue swings between a little under and a little over the target.
    max_workers, last_change, changes = 4, None, []
    for tick in range(120):
        now = tick * 30
        waiting = 8 if tick % 2 else 9  # 8 jobs on 4 workers: 60 s (at target); 9: 90 s (over)
        seen = Seen(max_workers=max_workers, min_workers=0, waiting_jobs=waiting, idle_workers=0,
                    typical_run_seconds=30, seconds_since_change=None if last_change is None else now - last_change,
                    spend_held=False)
        decision = decide(POLICY, seen)
        if decision.new_max is not None:
            changes.append((now, max_workers, decision.new_max))
            max_workers, last_change = decision.new_max, now

    assert [after > before for _, before, after in changes] == [True]  # one raise, and never back down
