"""Event streams and webhooks in the lifecycle, in-process on SQLite and PostgreSQL with the simulator."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import pytest

import jobs
from jobs.flow.dispatch import dispatch
from jobs.flow.lifecycle import poll_claimed, poll_job, submit_job
from jobs.flow.poller import claim_due, poll_due
from jobs.flow.reconcile import reconcile
from jobs.runtime import POLL_DUE_TASK, POLL_TASK, Runtime
from jobs.states import JobStatus
from jobs.storage.models import utcnow
from tests.conftest import ENDPOINT_ID, Published, SimulatorProcess
from tests.integration.test_dispatch_and_poller import make_due as make_due_now
from tests.integration.test_lifecycle import make_due, poll_until_final

pytestmark = pytest.mark.integration


def kinds(rt: Runtime, job_id: str) -> list[str]:
    return [item.kind for item in jobs.stream_events(job_id, runtime=rt)[1]]


def test_a_streaming_job_replays_started_every_chunk_in_order_then_end(runtime: Runtime) -> None:
    chunks = ["Once ", "upon ", "a tíme ", "🐉 ", "终"]
    job = jobs.submit("tts", {"sleep": 1.5, "stream": chunks}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)

    poll_until_final(runtime, job.id)

    _, items = jobs.stream_events(job.id, runtime=runtime)
    assert [i.kind for i in items] == ["started", *["output"] * len(chunks), "end"]
    assert [i.data for i in items if i.kind == "output"] == chunks
    assert [i.seq for i in items] == list(range(1, len(items) + 1))


def test_a_plain_job_streams_its_progress_then_its_output_once(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 2, "progress": ["50%"], "output": {"url": "s3://x"}}, runtime=runtime)
    submit_job(runtime, job.id)

    poll_until_final(runtime, job.id)

    _, items = jobs.stream_events(job.id, runtime=runtime)
    assert items[0].kind == "started" and [i.kind for i in items[-2:]] == ["output", "end"]
    assert [i.data for i in items if i.kind == "output"] == [{"url": "s3://x"}]
    assert all(i.data == "50%" for i in items if i.kind == "progress")


def test_a_failed_job_streams_one_error(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 0.3, "fail": "OOM"}, runtime=runtime)
    submit_job(runtime, job.id)

    poll_until_final(runtime, job.id)

    assert kinds(runtime, job.id)[-1] == "error"
    assert [k for k in kinds(runtime, job.id) if k in ("end", "error")] == ["error"]


def test_a_cancelled_job_streams_one_error(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 60}, runtime=runtime)

    jobs.cancel(job.id, runtime=runtime)

    _, items = jobs.stream_events(job.id, runtime=runtime)
    assert [(i.kind, i.data["status"]) for i in items] == [("error", "CANCELLED")]


def test_stream_events_resume_after_a_last_event_id_without_gaps_or_repeats(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 1, "stream": list("abcdef")}, stream=True, runtime=runtime)
    submit_job(runtime, job.id)
    poll_until_final(runtime, job.id)
    _, everything = jobs.stream_events(job.id, runtime=runtime)

    _, first = jobs.stream_events(job.id, after=0, runtime=runtime)
    _, rest = jobs.stream_events(job.id, after=first[2].seq, runtime=runtime)

    assert first[:3] + rest == everything


def test_a_retry_starts_a_new_stream(runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 0.2, "fail": "flaky"}, runtime=runtime)
    submit_job(runtime, job.id)
    poll_until_final(runtime, job.id)
    old_last = jobs.stream_events(job.id, runtime=runtime)[1][-1].seq

    jobs.retry(job.id, runtime=runtime)

    assert jobs.stream_events(job.id, runtime=runtime)[1] == []
    submit_job(runtime, job.id)
    poll_until_final(runtime, job.id)
    _, items = jobs.stream_events(job.id, runtime=runtime)
    assert items and items[0].seq > old_last and items[-1].kind == "error"


# -- webhooks -----------------------------------------------------------------------------------------


def webhook_of(simulator: SimulatorProcess, runpod_job_id: str) -> str:
    [sent] = [j for j in simulator.jobs(ENDPOINT_ID) if j["id"] == runpod_job_id]
    return str(sent["webhook"])


def test_each_job_gets_its_own_unguessable_webhook_and_only_its_hash_is_kept(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    a = jobs.submit("tts", {"sleep": 30}, correlation_id="req-42", runtime=webhook_runtime)
    b = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)
    submit_job(webhook_runtime, a.id)
    submit_job(webhook_runtime, b.id)

    url_a = urlsplit(webhook_of(simulator, jobs.get(a.id, runtime=webhook_runtime).runpod_job_id or ""))
    url_b = urlsplit(webhook_of(simulator, jobs.get(b.id, runtime=webhook_runtime).runpod_job_id or ""))
    token_a = url_a.path.rsplit("/", 1)[1]

    assert url_a.path.startswith("/v1/webhooks/runpod/") and url_a.path != url_b.path
    assert len(token_a) >= 40
    assert parse_qs(url_a.query) == {"correlation_id": ["req-42"]}  # RunPod keeps it beside the job
    assert token_a not in str(jobs.get(a.id, runtime=webhook_runtime).to_dict())


def test_a_webhook_triggers_an_immediate_poll_and_never_sets_state(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)
    token = webhook_of(simulator, jobs.get(job.id, runtime=webhook_runtime).runpod_job_id or "").split("/")[-1]
    published = webhook_runtime.publish
    assert isinstance(published, Published)
    published.messages.clear()

    assert jobs.webhook_received(token, runtime=webhook_runtime) is True
    assert jobs.webhook_received(token, runtime=webhook_runtime) is True  # a duplicate: harmless

    # The endpoint's poller is woken (this runtime's wake-ups are not deduplicated), not a message per job.
    assert published.of(POLL_DUE_TASK) == [ENDPOINT_ID, ENDPOINT_ID] and published.of(POLL_TASK) == []
    assert jobs.get(job.id, runtime=webhook_runtime).status is JobStatus.IN_QUEUE  # state comes from /status only
    outcome = poll_due(webhook_runtime, ENDPOINT_ID)  # due at once: the webhook cleared next_poll_at
    assert outcome.polled == 1 and jobs.get(job.id, runtime=webhook_runtime).poll_count == 1
    calls = [e for e in jobs.events(job.id, runtime=webhook_runtime) if e.source == "webhook"]
    assert [e.repeats for e in calls] == [2]  # one history row, counting both calls


def test_a_webhooks_poll_goes_before_every_scheduled_poll(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    waiting = [jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime) for _ in range(3)]
    for job in waiting:
        submit_job(webhook_runtime, job.id)
    make_due_now(webhook_runtime, *(job.id for job in waiting))  # all three due for their first poll
    woken = waiting[-1]
    token = webhook_of(simulator, jobs.get(woken.id, runtime=webhook_runtime).runpod_job_id or "").split("/")[-1]

    assert jobs.webhook_received(token, runtime=webhook_runtime) is True

    [first] = claim_due(webhook_runtime, ENDPOINT_ID, 1)
    assert first.id == woken.id


def test_jobs_dispatched_together_each_carry_a_webhook_token_of_their_own(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    together = [jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime) for _ in range(3)]
    own_hook = jobs.submit("tts", {"sleep": 30}, webhook="https://example.com/mine", runtime=webhook_runtime)
    dispatch(webhook_runtime, ENDPOINT_ID)
    make_due_now(webhook_runtime, *(job.id for job in together))  # all due: the webhook decides which goes first

    def token(job: jobs.Job) -> str:
        return webhook_of(simulator, jobs.get(job.id, runtime=webhook_runtime).runpod_job_id or "").split("/")[-1]

    tokens = [token(job) for job in together]
    assert len(set(tokens)) == 3
    assert jobs.webhook_received(tokens[1], runtime=webhook_runtime) is True
    [first] = claim_due(webhook_runtime, ENDPOINT_ID, 1)
    assert first.id == together[1].id
    assert webhook_of(simulator, jobs.get(own_hook.id, runtime=webhook_runtime).runpod_job_id or "") == \
        "https://example.com/mine"
    assert jobs.get(own_hook.id, runtime=webhook_runtime).webhook == "https://example.com/mine"


def test_a_webhook_during_a_poll_is_not_undone_by_that_polls_answer(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)
    token = webhook_of(simulator, jobs.get(job.id, runtime=webhook_runtime).runpod_job_id or "").split("/")[-1]
    make_due(webhook_runtime, job.id)
    [claimed] = claim_due(webhook_runtime, ENDPOINT_ID, 1)  # a poll is in flight ...

    assert jobs.webhook_received(token, runtime=webhook_runtime) is True  # ... when the webhook comes
    step = poll_claimed(webhook_runtime, claimed)  # the in-flight poll's answer: still running

    assert step.poll_in is not None  # it would have waited for the safety net ...
    assert jobs.get(job.id, runtime=webhook_runtime).poll_count == 1
    [again] = claim_due(webhook_runtime, ENDPOINT_ID, 1)  # ... but the webhook's poll is still due now
    assert again.id == job.id


def test_a_forged_webhook_token_is_refused_and_changes_nothing(webhook_runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)

    assert jobs.webhook_received("not-a-real-token", runtime=webhook_runtime) is False
    assert [e.source for e in jobs.events(job.id, runtime=webhook_runtime)].count("webhook") == 0


def test_with_webhooks_polls_relax_to_a_safety_net(webhook_runtime: Runtime) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)

    step = submit_job(webhook_runtime, job.id)
    make_due(webhook_runtime, job.id)
    later = poll_job(webhook_runtime, job.id)

    assert step.poll_in == webhook_runtime.webhook_schedule.first > webhook_runtime.schedule.first
    assert later.poll_in is not None and later.poll_in >= 2.5


def test_a_user_webhook_is_sent_as_given(webhook_runtime: Runtime, simulator: SimulatorProcess) -> None:
    job = jobs.submit("tts", {"sleep": 30}, webhook="https://example.com/mine", runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)

    assert webhook_of(simulator, jobs.get(job.id, runtime=webhook_runtime).runpod_job_id or "") == \
        "https://example.com/mine"


def test_a_late_webhook_for_a_finished_job_is_answered_and_changes_nothing(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"output": "done"}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)
    finished = poll_until_final(webhook_runtime, job.id)
    token = webhook_of(simulator, finished.runpod_job_id or "").split("?")[0].split("/")[-1]
    published = webhook_runtime.publish
    assert isinstance(published, Published)
    published.messages.clear()

    assert jobs.webhook_received(token, runtime=webhook_runtime) is True

    assert published.messages == []
    assert jobs.get(job.id, runtime=webhook_runtime) == finished


def test_a_webhook_whose_wake_up_cannot_be_published_is_still_answered_and_the_reconciler_wakes_the_poller(
    webhook_runtime: Runtime, simulator: SimulatorProcess
) -> None:
    job = jobs.submit("tts", {"sleep": 30}, runtime=webhook_runtime)
    submit_job(webhook_runtime, job.id)
    token = webhook_of(simulator, jobs.get(job.id, runtime=webhook_runtime).runpod_job_id or "").split("/")[-1]
    published = webhook_runtime.publish
    assert isinstance(published, Published)

    def broker_down(task: str, arg: str, countdown: float | None) -> None:
        raise ConnectionError("Redis is restarting")

    webhook_runtime.publish = broker_down
    assert webhook_runtime.wakeups is not None
    webhook_runtime.wakeups._publish = broker_down  # the wake-up publishes through the same broker

    assert jobs.webhook_received(token, runtime=webhook_runtime) is True  # RunPod gets its 200

    webhook_runtime.publish = published
    webhook_runtime.wakeups._publish = published
    published.messages.clear()
    report = reconcile(webhook_runtime, now=utcnow() + timedelta(minutes=5))
    assert report.woke_poller == [ENDPOINT_ID]  # the job's poll, due now in the table, is not lost
    assert published.of(POLL_DUE_TASK) == [ENDPOINT_ID]
    assert poll_due(webhook_runtime, ENDPOINT_ID).polled == 1
