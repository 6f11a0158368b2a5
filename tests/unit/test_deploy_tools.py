"""The deployment files pass the real tools: promtool (Debian's `prometheus` package) on the Prometheus
config, the alert rules and their unit tests, and the dashboard's queries; docker-compose 1.29 (Debian's
`docker-compose`) on docker-compose.yml, with and without the observability profile.

With CI=true a missing tool fails the run (`.ci/run` installs both); elsewhere it skips, saying how to
install it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import IN_CI
from tests.promql import dashboard_queries

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "rpq-dashboard.json"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; install it with: apt-get install -y {package}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


def run(*command: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=60, env=env)


# -- promtool ------------------------------------------------------------------------------------------------


def promtool() -> str:
    return tool("promtool", "prometheus")


def test_promtool_accepts_the_alert_rules() -> None:
    checked = run(promtool(), "check", "rules", PROMETHEUS / "alerts.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 10 rules found" in checked.stdout


def test_promtool_accepts_the_prometheus_config_and_the_rule_file_it_loads() -> None:
    checked = run(promtool(), "check", "config", PROMETHEUS / "prometheus.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say() -> None:
    tested = run(promtool(), "test", "rules", PROMETHEUS / "alerts_test.yml")

    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_alert_unit_tests_fail_on_a_wrong_threshold(tmp_path: Path) -> None:
    rules = (PROMETHEUS / "alerts.yml").read_text()
    assert "max(rpq_poll_lag_seconds) > 30" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("max(rpq_poll_lag_seconds) > 30",
                                                       "max(rpq_poll_lag_seconds) > 300"))
    shutil.copy(PROMETHEUS / "alerts_test.yml", tmp_path / "alerts_test.yml")

    tested = run(promtool(), "test", "rules", tmp_path / "alerts_test.yml")

    assert tested.returncode != 0
    assert "alertname: RpqPollLagOverGrace" in tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_that_fires_it_and_one_that_does_not() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
              for rule in group["rules"]}
    cases = [case for test in yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
             for case in test["alert_rule_test"]]

    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts


#: Grafana's variables, as Prometheus would see them once Grafana has put in their values.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "30s", "$__range": "6h", "$endpoint": ".*"}


def dashboard_as_recording_rules(dashboard: dict[str, object]) -> str:
    rules = []
    for n, (where, expr) in enumerate(dashboard_queries(dashboard)):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"{where}: a Grafana variable this test does not know: {expr}"
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    return yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})


def test_every_dashboard_query_parses_in_prometheus(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (tmp_path / "dashboard.yml").write_text(dashboard_as_recording_rules(dashboard))

    checked = run(promtool(), "check", "rules", tmp_path / "dashboard.yml")

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.search(r"SUCCESS: (\d+) rules found", checked.stdout)[1] == str(len(list(dashboard_queries(dashboard))))


def test_a_dashboard_query_prometheus_cannot_parse_is_caught(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    jobs = next(panel for panel in dashboard["panels"] if panel["title"] == "Jobs by status")
    jobs["targets"][0]["expr"] = "sum by (status) (rate(rpq_jobs[$__rate_interval])"  # one ")" short
    (tmp_path / "dashboard.yml").write_text(dashboard_as_recording_rules(dashboard))

    checked = run(promtool(), "check", "rules", tmp_path / "dashboard.yml")

    assert checked.returncode != 0


# -- docker-compose ------------------------------------------------------------------------------------------

#: Placeholders for the secrets docker-compose.yml requires: config checks they are set, not what they are.
COMPOSE_SECRETS = {"RUNPOD_API_KEY": "placeholder", "POSTGRES_PASSWORD": "placeholder",
                   "AWS_SECRET_ACCESS_KEY": "placeholder", "FLOWER_BASIC_AUTH": "user:placeholder",
                   "RPQ_API_TOKENS": "placeholder"}


def compose_config(tmp_path: Path, *profile: str, secrets: dict[str, str] = COMPOSE_SECRETS,
                   compose_file: Path = ROOT / "docker-compose.yml") -> subprocess.CompletedProcess[str]:
    """`docker-compose config -q` with only the given variables set (nothing from this shell), and an empty
    .env beside it: the file names .env as env_file, which a checkout has not got (it is ignored by git)."""
    executable = tool("docker-compose", "docker-compose")
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / ".env").touch()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **secrets}
    return run(executable, "--file", compose_file, "--project-directory", project, *profile, "config", "-q", env=env)


@pytest.mark.parametrize("profile", [(), ("--profile", "observability")], ids=["default", "observability"])
def test_docker_compose_accepts_the_file(tmp_path: Path, profile: tuple[str, ...]) -> None:
    checked = compose_config(tmp_path, *profile)

    assert checked.returncode == 0, checked.stderr


def test_docker_compose_stops_on_a_missing_secret_and_names_it(tmp_path: Path) -> None:
    secrets = {name: value for name, value in COMPOSE_SECRETS.items() if name != "POSTGRES_PASSWORD"}

    checked = compose_config(tmp_path, secrets=secrets)

    assert checked.returncode != 0
    assert "set POSTGRES_PASSWORD in .env" in checked.stderr


def test_docker_compose_refuses_a_dependency_condition_it_does_not_know(tmp_path: Path) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "minio: {condition: service_healthy}" in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace("minio: {condition: service_healthy}", "minio: {condition: service_ready}"))

    checked = compose_config(tmp_path, compose_file=broken)

    assert checked.returncode != 0
