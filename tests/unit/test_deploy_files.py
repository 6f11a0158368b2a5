"""What the deployment files promise, read from the files: every Compose service has a health check, no
secret is written into docker-compose.yml or the image, the image's base is pinned and it runs as a user
other than root, and the pieces name each other rightly (the scrape target, the dashboard's mount, the
runbook headings in the README). The real tools check the syntax (test_deploy_tools.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


# -- health checks ---------------------------------------------------------------------------------------------


def services_without_a_health_check(config: dict[str, Any]) -> list[str]:
    def checked(service: dict[str, Any]) -> bool:
        check = service.get("healthcheck") or {}
        return bool(check.get("test")) and not check.get("disable") and check["test"] != ["NONE"]

    return sorted(name for name, service in config["services"].items() if not checked(service))


def test_every_compose_service_has_a_health_check() -> None:
    config = compose()

    assert len(config["services"]) == 13
    assert services_without_a_health_check(config) == []


def test_a_service_without_a_health_check_or_with_it_disabled_is_caught() -> None:
    config = compose()
    del config["services"]["beat"]["healthcheck"]
    config["services"]["flower"]["healthcheck"] = {"disable": True}

    assert services_without_a_health_check(config) == ["beat", "flower"]


# -- secrets ------------------------------------------------------------------------------------------------------

#: Variable names that hold a secret. Access key ids and user names are not secrets.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|BASIC_AUTH|PRIVATE")
#: A value taken from the environment with no default: ${NAME}, ${NAME?msg} or ${NAME:?msg}.
FROM_ENVIRONMENT = re.compile(r"^\$\{[A-Z0-9_]+(?::?\?[^}]*)?\}$")
#: user:password@ in a URL, where the password is not a ${...} with no default.
URL_PASSWORD = re.compile(r"://[^/\s:@]*:(?P<password>[^@\s]+)@")


def baked_in_secrets(config: dict[str, Any]) -> list[str]:
    """Where docker-compose.yml writes a secret itself instead of taking it from the environment or a file."""
    found = []
    for name, service in config["services"].items():
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) if "=" in item else (item, None) for item in environment)
        for variable, value in environment.items():
            text = "" if value is None else str(value)
            if SECRET_NAME.search(variable) and not variable.endswith("__FILE") and not FROM_ENVIRONMENT.match(text):
                found.append(f"{name}: {variable}")
            password = URL_PASSWORD.search(text)
            if password and not FROM_ENVIRONMENT.match(password["password"]):
                found.append(f"{name}: {variable} (a password in the URL)")
    for name, secret in (config.get("secrets") or {}).items():
        if set(secret) - {"file", "environment"}:
            found.append(f"secret {name}: not from a file or the environment")
    return found


def test_no_secret_is_written_into_docker_compose() -> None:
    config = compose()

    assert baked_in_secrets(config) == []
    # The file does not merely avoid the names: the secrets are there, taken from the environment.
    environment = config["services"]["worker"]["environment"]
    assert environment["RUNPOD_API_KEY"].startswith("${RUNPOD_API_KEY:?")
    assert "${POSTGRES_PASSWORD:?" in environment["DATABASE_URL"]
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == \
        "/run/secrets/grafana_admin_password"


@pytest.mark.parametrize("service, variable, value, caught", [
    ("postgres", "POSTGRES_PASSWORD", "rpq", "postgres: POSTGRES_PASSWORD"),
    ("minio", "MINIO_ROOT_PASSWORD", "${AWS_SECRET_ACCESS_KEY:-rpq-local-secret}", "minio: MINIO_ROOT_PASSWORD"),
    ("worker", "DATABASE_URL", "postgresql+psycopg://rpq:rpq@postgres:5432/rpq",
     "worker: DATABASE_URL (a password in the URL)"),
    ("api", "RPQ_API_TOKENS", "sha256:0123abcd", "api: RPQ_API_TOKENS"),
])
def test_a_secret_written_into_docker_compose_is_caught(service: str, variable: str, value: str, caught: str) -> None:
    config = compose()
    target = config["services"][service]
    target["environment"] = {**target["environment"], variable: value}  # YAML anchors share one mapping

    assert baked_in_secrets(config) == [caught]


def test_the_compose_secret_files_are_ignored_by_git() -> None:
    files = [secret["file"] for secret in compose()["secrets"].values()]

    assert files == ["./secrets/grafana_admin_password"]
    assert "secrets/" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_file_compose_mounts_is_in_the_repository() -> None:
    mounts = [volume.split(":")[0] for service in compose()["services"].values()
              for volume in service.get("volumes", []) if volume.startswith("./")]

    assert mounts
    assert [m for m in mounts if not (ROOT / m).exists()] == []


# -- the image ------------------------------------------------------------------------------------------------------


def dockerfile_problems(text: str) -> list[str]:
    """What keeps the image from being slim, pinned, non-root and free of secrets."""
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]
    problems = []
    bases = [args.split()[0] for op, args in instructions if op == "FROM"]
    for base in bases:
        tag = base.partition("@")[0].partition(":")[2]
        if "@sha256:" not in base and not re.match(r"^\d+\.\d+\.\d+", tag):
            problems.append(f"base {base} is not pinned to an exact version or a digest")
    if bases and "slim" not in bases[-1] and "alpine" not in bases[-1] and "distroless" not in bases[-1]:
        problems.append(f"base {bases[-1]} is not a slim image")
    users = [args for op, args in instructions if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image runs as root")
    for op, args in instructions:
        if op == "ADD" or (op == "COPY" and args.split()[0] in (".", "./")):
            problems.append(f"{op} {args}: copies more than the listed files (an .env could come along)")
        if op in ("ENV", "ARG") and SECRET_NAME.search(args):
            problems.append(f"{op} {args}: a secret in the image")
    return problems


def test_the_image_is_slim_pinned_non_root_and_holds_no_secret() -> None:
    text = DOCKERFILE.read_text()

    assert dockerfile_problems(text) == []
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm$", text, re.MULTILINE)
    assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)  # numeric: an orchestrator can verify it


@pytest.mark.parametrize("change, problem", [
    (("FROM python:3.11.11-slim-bookworm", "FROM python:3.11-slim"), "not pinned"),
    (("FROM python:3.11.11-slim-bookworm", "FROM python:3.11.11-bookworm"), "not a slim image"),
    (("USER 10001:10001", "USER root"), "runs as root"),
    (("USER 10001:10001", ""), "runs as root"),
    (("COPY jobs ./jobs", "COPY . ."), "copies more than"),
    (("ENV PYTHONDONTWRITEBYTECODE=1", "ENV RUNPOD_API_KEY=abc PYTHONDONTWRITEBYTECODE=1"), "a secret in the image"),
])
def test_a_dockerfile_that_breaks_a_rule_is_caught(change: tuple[str, str], problem: str) -> None:
    text = DOCKERFILE.read_text()
    assert change[0] in text

    [found] = dockerfile_problems(text.replace(change[0], change[1]))

    assert problem in found


def test_the_build_context_holds_only_what_the_image_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()

    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*"  # everything out, then...
    assert not [line for line in ignore if line.startswith("!") and ".env" in line]


# -- how the pieces name each other ----------------------------------------------------------------------------


def test_prometheus_scrapes_the_compose_metrics_service_on_its_port() -> None:
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    metrics = compose()["services"]["metrics"]

    assert [target for job in scrape for config in job["static_configs"] for target in config["targets"]] == \
        [f"metrics:{metrics['command'][metrics['command'].index('--port') + 1]}"]


def test_grafana_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    grafana = compose()["services"]["grafana"]
    mounted = {source: target.removesuffix(":ro") for source, target in
               (volume.split(":", 1) for volume in grafana["volumes"])}
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/rpq.yml").read_text())["providers"][0]
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    dashboard = json.loads((ROOT / "deploy/grafana/rpq-dashboard.json").read_text())
    [chosen] = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]

    assert Path(mounted["./deploy/grafana/rpq-dashboard.json"]).parent == Path(provider["options"]["path"])
    assert mounted["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert chosen["current"]["value"] == datasource["datasources"][0]["uid"]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a README's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.DOTALL), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_every_alert_has_a_runbook_heading_in_the_readme() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    anchors = github_anchors((ROOT / "README.md").read_text())
    runbooks = {rule["alert"]: rule["annotations"]["runbook"] for rule in rules}

    assert {alert: runbook for alert, runbook in runbooks.items()
            if runbook != f"README.md#{alert.lower()}" or alert.lower() not in anchors} == {}
