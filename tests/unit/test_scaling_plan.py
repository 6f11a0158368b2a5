"""plan_scale: what a change of worker bounds would do, and every reason to refuse it, from a configuration."""

from __future__ import annotations

from dataclasses import replace

from jobs.runpod.management import EndpointConfig
from jobs.runpod.scaling import Workers, plan_scale

CURRENT = EndpointConfig(id="ep-scale-test", name="tts", type="QUEUE", workers_min=1, workers_max=3, idle_timeout=5,
                         scaling_type="QUEUE_DELAY", scaling_value=4.0, gpu_pools=("ADA_24",), gpu_count=1,
                         timeout_ms=600_000, flashboot=True)


def constraints(plan) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return [(p.field, p.constraint) for p in plan.problems]


def test_raising_max_keeps_min_and_idle_timeout_as_read_and_explains_runpods_caps() -> None:
    plan = plan_scale(CURRENT, max=8)

    assert plan.ok and plan.changes == ("max",)
    assert (plan.before, plan.after) == (Workers(1, 3, 5), Workers(1, 8, 5))
    assert any("balance" in note and "60 at $900" in note for note in plan.notes)
    assert any("3 days" in note and "7" in note for note in plan.notes)


def test_lowering_max_carries_no_note_about_caps() -> None:
    plan = plan_scale(CURRENT, max=2)

    assert plan.ok and plan.after == Workers(1, 2, 5) and plan.notes == ()


def test_a_max_above_the_highest_tier_is_allowed_but_said_to_need_a_raised_limit() -> None:
    plan = plan_scale(CURRENT, max=80)

    assert plan.ok and any("above 60" in note for note in plan.notes)


def test_every_problem_is_listed_at_once() -> None:
    plan = plan_scale(CURRENT, max=-1, min=-2, idle_timeout=0)

    assert constraints(plan) == [("max", "range"), ("min", "range"), ("idle_timeout", "range")]
    assert plan.notes == ()


def test_min_above_max_is_refused_even_when_min_is_the_endpoints_own() -> None:
    given = plan_scale(CURRENT, max=2, min=3)
    kept = plan_scale(replace(CURRENT, workers_min=2), max=1)

    assert constraints(given) == [("min", "range")]
    assert constraints(kept) == [("min", "range")] and "current value" in kept.problems[0].message


def test_idle_timeout_must_be_within_runpods_bounds() -> None:
    assert constraints(plan_scale(CURRENT, idle_timeout=3601)) == [("idle_timeout", "range")]
    assert plan_scale(CURRENT, idle_timeout=3600).ok and plan_scale(CURRENT, idle_timeout=1).ok


def test_an_idle_timeout_is_refused_for_an_endpoint_scaling_on_request_count() -> None:
    request_count = replace(CURRENT, scaling_type="REQUEST_COUNT", scaling_value=2.0, idle_timeout=None)

    plan = plan_scale(request_count, max=4, idle_timeout=30)

    assert constraints(plan) == [("idle_timeout", "scaling")]
    assert plan_scale(request_count, max=4).after == Workers(1, 4, None)


def test_asking_for_nothing_or_for_what_is_there_already_is_refused() -> None:
    assert constraints(plan_scale(CURRENT)) == [("workers", "required")]
    assert constraints(plan_scale(CURRENT, max=3, min=1, idle_timeout=5)) == [("workers", "unchanged")]


def test_raising_min_says_those_workers_are_billed_and_max_zero_says_nothing_runs() -> None:
    assert any("billed" in note for note in plan_scale(CURRENT, min=2).notes)
    assert any("no worker runs" in note for note in plan_scale(replace(CURRENT, workers_min=0), max=0).notes)


def test_a_bool_is_not_a_number_of_workers() -> None:
    assert constraints(plan_scale(CURRENT, max=True)) == [("max", "range")]
