"""The image builds what the wheel ships: everything pyproject.toml packages is copied in by the Dockerfile."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def copied_into_the_image() -> set[str]:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    return {source.rstrip("/") for line in lines if line.startswith("COPY ") for source in line.split()[1:-1]}


def test_the_dockerfile_copies_every_module_and_package_the_wheel_ships() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = {f"{module}.py" for module in setuptools.get("py-modules", [])}
    shipped |= {pattern.rstrip("*") for pattern in setuptools["packages"]["find"]["include"]}

    assert shipped == {"rpq_worker.py", "jobs", "tasks"}  # what this test knows of: extend it with the wheel
    assert shipped <= copied_into_the_image()
