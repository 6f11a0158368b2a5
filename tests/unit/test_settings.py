from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.json import dumps

from jobs.errors import ConfigError
from jobs.runpod.budget import Limits
from jobs.settings import Endpoint, Secret, Settings, redact_url


def test_defaults_are_runpods_production_urls_and_local_services() -> None:
    settings = Settings.from_env({})

    assert settings.runpod_api_key is None
    assert settings.runpod_serverless_url == "https://api.runpod.ai/v2"
    assert settings.runpod_graphql_url == "https://api.runpod.io/graphql"
    assert settings.runpod_collection_interval_seconds == 300
    assert settings.runpod_health_poll_seconds == 120
    assert settings.runpod_job_retention_days == 90
    assert settings.database_url == "sqlite:///rpq.db"
    assert settings.celery_broker_url == "redis://localhost:6379/0"
    assert settings.endpoints == {}


def test_every_variable_is_read() -> None:
    settings = Settings.from_env({
        "RUNPOD_API_KEY": "rp-key",
        "RUNPOD_SERVERLESS_URL": "http://127.0.0.1:8000/v2/",
        "RUNPOD_GRAPHQL_URL": "http://127.0.0.1:8001/graphql",
        "RUNPOD_REST_URL": "http://127.0.0.1:8002/v2",
        "RUNPOD_COLLECTION_INTERVAL_SECONDS": "60",
        "RUNPOD_HEALTH_POLL_SECONDS": "30",
        "RUNPOD_JOB_RETENTION_DAYS": "7",
        "RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5, export=abc123",
        "DATABASE_URL": "postgresql+psycopg://rpq@db/rpq",
        "CELERY_BROKER_URL": "redis://redis:6379/2",
    })

    assert settings.require_api_key().reveal() == "rp-key"
    assert settings.runpod_serverless_url == "http://127.0.0.1:8000/v2"  # trailing slash dropped
    assert settings.runpod_rest_url == "http://127.0.0.1:8002/v2"
    assert (settings.runpod_collection_interval_seconds, settings.runpod_health_poll_seconds) == (60, 30)
    assert settings.runpod_job_retention_days == 7
    assert settings.endpoints == {
        "tts": Endpoint("tts", "fh46rj7dq9r3o5"),
        "export": Endpoint("export", "abc123"),
    }
    assert settings.database_url == "postgresql+psycopg://rpq@db/rpq"
    assert settings.celery_broker_url == "redis://redis:6379/2"


def test_every_bad_variable_is_reported_at_once_by_name() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({
            "RUNPOD_SERVERLESS_URL": "api.runpod.ai/v2",
            "RUNPOD_HEALTH_POLL_SECONDS": "often",
            "RUNPOD_JOB_RETENTION_DAYS": "0",
            "RUNPOD_ENDPOINTS": "tts=Not An Id,tts=abc123,9bad=abc123",
            "DATABASE_URL": "mysql://db",
            "CELERY_BROKER_URL": "amqp://guest@localhost//",
        })

    text = str(caught.value)
    for name in ("RUNPOD_SERVERLESS_URL", "RUNPOD_HEALTH_POLL_SECONDS", "RUNPOD_JOB_RETENTION_DAYS",
                 "DATABASE_URL", "CELERY_BROKER_URL"):
        assert name in text
    assert "'Not An Id'" in text and "'9bad'" in text
    assert len(caught.value.problems) == 7


def test_a_bare_endpoint_id_is_accepted_wherever_a_name_is() -> None:
    settings = Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5,abc123"})

    assert settings.resolve_endpoint("tts") == Endpoint("tts", "fh46rj7dq9r3o5")
    assert settings.resolve_endpoint("abc123") == Endpoint("abc123", "abc123")
    assert settings.resolve_endpoint("zz9plural") == Endpoint("zz9plural", "zz9plural")


def test_an_unknown_endpoint_name_is_an_error_that_lists_the_known_ones() -> None:
    settings = Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5"})

    with pytest.raises(ConfigError, match=r"unknown endpoint 'TTS'.*\(tts\)"):
        settings.resolve_endpoint("TTS")


def test_a_missing_api_key_is_reported_only_when_needed() -> None:
    settings = Settings.from_env({})

    with pytest.raises(ConfigError, match="RUNPOD_API_KEY"):
        settings.require_api_key()


def test_the_api_key_never_shows_in_repr_str_or_pickles() -> None:
    settings = Settings.from_env({"RUNPOD_API_KEY": "rp-super-secret-key"})

    assert "rp-super-secret-key" not in repr(settings)
    assert "rp-super-secret-key" not in str(settings)
    assert "rp-super-secret-key" not in f"{settings.runpod_api_key}"
    with pytest.raises(TypeError):
        pickle.dumps(Secret("rp-super-secret-key"))
    with pytest.raises(TypeError):
        pickle.dumps(settings)


def test_neither_the_api_key_nor_the_settings_can_ride_in_a_celery_message() -> None:
    settings = Settings.from_env({"RUNPOD_API_KEY": "rp-super-secret-key"})

    for value in (settings.runpod_api_key, settings):
        with pytest.raises(TypeError):
            dumps({"args": [value]})


def test_the_poll_schedule_is_tunable_within_safe_bounds() -> None:
    tuned = Settings.from_env({"RPQ_POLL_FIRST_SECONDS": "0.5", "RPQ_POLL_MAX_SECONDS": "5"})

    assert (tuned.poll_first_seconds, tuned.poll_max_seconds) == (0.5, 5.0)
    with pytest.raises(ConfigError, match="RPQ_POLL_MAX_SECONDS: Input should be less than or equal to 300"):
        Settings.from_env({"RPQ_POLL_MAX_SECONDS": "3600"})


def test_a_submit_is_called_lost_only_after_the_longest_a_run_can_take() -> None:
    settings = Settings.from_env({"RUNPOD_TIMEOUT_SECONDS": "30"})

    # The client gives up retrying /run at the budget; the last attempt may still use its timeouts.
    assert settings.submit_budget_seconds == 70
    assert settings.submit_bound_seconds == 70 + 30 + 30 + 30 + 5
    assert settings.submit_stuck_after_seconds > settings.submit_bound_seconds
    assert Settings.from_env({"RUNPOD_TIMEOUT_SECONDS": "5"}).submit_stuck_after_seconds < 120


def test_a_stuck_threshold_a_live_run_could_outlast_is_refused() -> None:
    with pytest.raises(ConfigError, match="RPQ_SUBMIT_STUCK_SECONDS: must be more than 165"):
        Settings.from_env({"RPQ_SUBMIT_STUCK_SECONDS": "120"})
    assert Settings.from_env({"RPQ_SUBMIT_STUCK_SECONDS": "600"}).submit_stuck_after_seconds == 600


def test_the_runpod_request_budget_defaults_below_runpods_limits_and_takes_any_subset() -> None:
    assert Settings.from_env({}).runpod_limits == Limits(run=800, status=1400, cancel=80, purge=1)
    assert Settings.from_env({"RPQ_RUNPOD_LIMITS": "status=1500"}).runpod_limits == Limits(status=1500)
    # Above RunPod's documented 2000: allowed, for endpoints whose running workers raise their limit.
    assert Settings.from_env({"RPQ_RUNPOD_LIMITS": "status=5000,run=3000"}).runpod_limits.status == 5000


def test_bad_request_budgets_are_reported_with_every_other_bad_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RPQ_RUNPOD_LIMITS": "status=0,poll=5", "RPQ_POLL_FIRST_SECONDS": "soon"})

    assert [p.split(":")[0] for p in caught.value.problems] == [
        "RPQ_POLL_FIRST_SECONDS", "RPQ_RUNPOD_LIMITS", "RPQ_RUNPOD_LIMITS"]


def test_the_example_environment_file_is_a_valid_configuration() -> None:
    lines = (Path(__file__).resolve().parents[2] / ".env.example").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))

    assert Settings.from_env(env).runpod_limits == Limits()


def test_passwords_in_the_database_and_broker_urls_never_show_in_repr_or_str() -> None:
    settings = Settings.from_env({
        "DATABASE_URL": "postgresql+psycopg://rpq:db-p%40ss@word@db:5432/rpq?sslmode=require",
        "CELERY_BROKER_URL": "rediss://:broker-secret@redis:6380/0",
        "RUNPOD_WEBHOOK_BASE_URL": "https://hook:hook-secret@rpq.example.com",
    })

    shown = repr(settings)
    assert not [s for s in ("db-p%40ss", "word@db", "broker-secret", "hook-secret") if s in shown + str(settings)]
    assert "database_url='postgresql+psycopg://rpq:***@db:5432/rpq?sslmode=require'" in shown
    assert "celery_broker_url='rediss://:***@redis:6380/0'" in shown
    assert settings.database_url.endswith("@word@db:5432/rpq?sslmode=require")  # only the repr is masked


@pytest.mark.parametrize("url, shown", [
    ("postgresql://rpq@db/rpq?password=secret&sslmode=require", "postgresql://rpq@db/rpq?password=***&sslmode=require"),
    ("redis://localhost:6379/0", "redis://localhost:6379/0"),
    ("sqlite:///rpq.db", "sqlite:///rpq.db"),
    ("redis://user:secret@[::1]:6379", "redis://user:***@[::1]:6379"),
])
def test_redact_url_masks_the_password_wherever_a_url_carries_one(url: str, shown: str) -> None:
    assert redact_url(url) == shown


#: One wrong value for every variable rpq reads but the API key (any string is a key). Two hold a password,
#: which no message may repeat.
BAD_VALUES = {
    "RUNPOD_SERVERLESS_URL": "api.runpod.ai/v2",
    "RUNPOD_GRAPHQL_URL": "ftp://api.runpod.io/graphql",
    "RUNPOD_REST_URL": "runpod",
    "RUNPOD_WEBHOOK_BASE_URL": "rpq.example.com",
    "RUNPOD_TIMEOUT_SECONDS": "0",
    "RUNPOD_COLLECTION_INTERVAL_SECONDS": "5m",
    "RUNPOD_HEALTH_POLL_SECONDS": "-120",
    "RUNPOD_JOB_RETENTION_DAYS": "1.5",
    "RUNPOD_ENDPOINTS": "tts=Not An Id",
    "DATABASE_URL": "mysql://rpq:hunter2@db/rpq",
    "CELERY_BROKER_URL": "amqp://guest:hunter2@localhost//",
    "RPQ_POLL_FIRST_SECONDS": "inf",
    "RPQ_POLL_MAX_SECONDS": "0.5",
    "RPQ_RECONCILE_SECONDS": "soon",
    "RPQ_POLL_GRACE_SECONDS": "0",
    "RPQ_SUBMIT_STUCK_SECONDS": "never",
    "RPQ_MAX_IN_FLIGHT": "tts",
    "RPQ_RUNPOD_LIMITS": "status=0",
    "RPQ_S3_BUCKET": "My_Bucket",
    "RPQ_S3_ENDPOINT_URL": "abc.r2.cloudflarestorage.com",
    "RPQ_S3_REGION": "US East",
    "RPQ_S3_PREFIX": "/rpq/",
    "RPQ_PRESIGN_SECONDS": "604801",
    "RPQ_INLINE_OUTPUT_MAX_BYTES": "0",
    "RPQ_UPLOAD_MAX_BYTES": "5368709121",
    "RPQ_BUDGET_MAX_SPEND_PER_HOUR": "0",
    "RPQ_AUTOSCALE": "tts=5:2:30",
    "RPQ_BUDGET_MIN_BALANCE": "-1",
    "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR": "tts=-2",
    "RPQ_BUDGET_LOWER_WORKERS_TO": "some",
    "RPQ_LOG_FORMAT": "logfmt",
    "RPQ_LOG_LEVEL": "verbose",
    "RPQ_TENANT_MAX_IN_FLIGHT": "shop=0",
    "RPQ_TENANT_SUBMITS_PER_MINUTE": "*",
    "RPQ_METADATA_INDEX": "user.id",
    "RPQ_CONSOLE_SECRET": "hunter2-is-too-short",
    "RPQ_API_SECRET": "short",
    "RPQ_EVENTS_URL_SECONDS": "5",
    "RPQ_FLOWER_URL": "flower:5555",
    "RPQ_METRICS_URL": "ftp://metrics",
}
#: Variables in .env.example that other parts read: Flower its login, the HTTP API its tokens (jobs.web.auth).
READ_ELSEWHERE = {"FLOWER_BASIC_AUTH", "RPQ_API_TOKENS", "RPQ_API_ALLOW_NO_AUTH"}


def example_environment() -> dict[str, str]:
    lines = (Path(__file__).resolve().parents[2] / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_every_variable_has_a_bad_value_here_and_a_line_in_the_example_file() -> None:
    variables = {str(field.validation_alias) for field in Settings.model_fields.values()}

    # Secrets take any text: there is no bad value for them.
    assert variables == {*BAD_VALUES, "RUNPOD_API_KEY", "RPQ_WORKER_S3_ACCESS_KEY_ID",
                         "RPQ_WORKER_S3_SECRET_ACCESS_KEY"}
    assert set(example_environment()) == variables | READ_ELSEWHERE


def test_the_example_file_gives_every_default() -> None:
    example = Settings.from_env(example_environment())

    assert example.model_copy(update={"endpoints": {}}) == Settings()


@given(st.sets(st.sampled_from(sorted(BAD_VALUES)), min_size=1))
def test_any_set_of_bad_variables_is_reported_at_once_each_by_name_and_no_password_shown(bad: set[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({name: BAD_VALUES[name] for name in bad})

    assert {problem.split(":")[0] for problem in caught.value.problems} == bad
    assert len(caught.value.problems) == len(bad)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_a_blank_or_spaces_only_value_leaves_the_default(name: str) -> None:
    assert Settings.from_env({name: "   "}) == Settings.from_env({name: ""}) == Settings()


def test_only_from_env_reads_the_environment_and_never_a_dotenv_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "from-the-environment")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("DATABASE_URL=postgresql://rpq@db/rpq\nRPQ_POLL_MAX_SECONDS=5\n")

    assert Settings().runpod_api_key is None  # code that builds its own settings gets what it asked for
    from_env = Settings.from_env()
    assert from_env.require_api_key().reveal() == "from-the-environment"
    assert (from_env.database_url, from_env.poll_max_seconds) == ("sqlite:///rpq.db", 15.0)


def test_variable_names_are_read_as_written() -> None:
    assert Settings.from_env({"runpod_api_key": "rp-key", "Rpq_Poll_Max_Seconds": "5"}) == Settings()


def test_a_cap_on_an_unknown_endpoint_is_reported_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5", "RPQ_MAX_IN_FLIGHT": "tts=2,export=4,tts=3",
                           "RPQ_RECONCILE_SECONDS": "0"})

    assert caught.value.problems == [
        "RPQ_RECONCILE_SECONDS: Input should be greater than 0",
        "RPQ_MAX_IN_FLIGHT: 'export' is not an endpoint in RUNPOD_ENDPOINTS (tts)",
        "RPQ_MAX_IN_FLIGHT: 'tts' is listed twice",
    ]
    assert Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5", "RPQ_MAX_IN_FLIGHT": "tts=2"}) \
        .max_in_flight_for("fh46rj7dq9r3o5") == 2


def test_endpoint_budgets_take_usd_an_hour_per_configured_endpoint_and_report_every_problem() -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5",
                           "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR": "tts=0,export=2,tts,video=1e3"})

    assert caught.value.problems == [
        "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR: 'tts=0' is not NAME=USD with USD an hourly amount above 0",
        "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR: 'export' is not an endpoint in RUNPOD_ENDPOINTS (tts)",
        "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR: 'tts' is not NAME=USD with USD an hourly amount above 0",
        "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR: 'video=1e3' is not NAME=USD with USD an hourly amount above 0",
    ]
    settings = Settings.from_env({"RUNPOD_ENDPOINTS": "tts=fh46rj7dq9r3o5",
                                  "RPQ_BUDGET_ENDPOINT_MAX_SPEND_PER_HOUR": "tts=2.5"})
    assert settings.budget_endpoint_max_spend_per_hour == {"tts": 2.5}
    assert settings.endpoint_name_for("fh46rj7dq9r3o5") == "tts" and settings.endpoint_name_for("other") is None


def test_settings_built_in_code_are_checked_too_and_copies_keep_the_key() -> None:
    with pytest.raises(ValueError, match="poll_max_seconds"):
        Settings(poll_max_seconds=3600)
    settings = Settings(runpod_api_key=Secret("rp-key"), endpoints={"tts": Endpoint("tts", "fh46rj7dq9r3o5")})

    capped = settings.model_copy(update={"max_in_flight": {"tts": 2}})
    assert capped.max_in_flight_for("fh46rj7dq9r3o5") == 2 and settings.max_in_flight_for("fh46rj7dq9r3o5") is None
    assert capped.require_api_key().reveal() == "rp-key"


def test_files_are_off_by_default_and_read_from_their_variables() -> None:
    assert Settings.from_env({}).s3_bucket is None
    settings = Settings.from_env({
        "RPQ_S3_BUCKET": "rpq-outputs",
        "RPQ_S3_ENDPOINT_URL": "https://0123abcd.r2.cloudflarestorage.com/",
        "RPQ_S3_REGION": "auto",
        "RPQ_S3_PREFIX": "prod/rpq",
        "RPQ_PRESIGN_SECONDS": "604800",
    })

    assert (settings.s3_bucket, settings.s3_region, settings.s3_prefix) == ("rpq-outputs", "auto", "prod/rpq")
    assert settings.s3_endpoint_url == "https://0123abcd.r2.cloudflarestorage.com"
    assert settings.presign_seconds == 604800


@pytest.mark.parametrize("prefix", ["/rpq", "rpq/", "a//b", "a/../b", "..", "rpq files", "rpq\\x"])
def test_a_prefix_that_could_escape_or_blur_its_keys_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RPQ_S3_PREFIX": prefix})

    assert [problem.split(":")[0] for problem in caught.value.problems] == ["RPQ_S3_PREFIX"]
