"""How the Celery app is configured, read off the app itself (no broker is contacted)."""

from __future__ import annotations

from jobs.settings import Settings
from tasks.app import COLLECT_TASK, collect_time_limits, make_app


def test_a_collectors_round_may_take_most_of_its_interval_and_never_less_than_other_tasks() -> None:
    slow = make_app(Settings(runpod_collection_interval_seconds=900))
    fast = make_app(Settings(runpod_collection_interval_seconds=60))

    soft, hard = slow.conf.task_soft_time_limit, slow.conf.task_time_limit
    assert slow.conf.task_annotations[COLLECT_TASK] == {"soft_time_limit": 720.0, "time_limit": hard + 720 - soft}
    assert fast.conf.task_annotations[COLLECT_TASK] == {"soft_time_limit": soft, "time_limit": hard}


def test_the_worker_sees_the_collect_tasks_own_limits() -> None:
    import tasks.jobs  # registers the tasks on the app the worker runs

    task = tasks.jobs.app.tasks[COLLECT_TASK]
    assert (task.soft_time_limit, task.time_limit) == tuple(collect_time_limits(Settings.from_env()).values())
