"""RunPod's official JS SDK (runpod-sdk, pinned in tests/js), unchanged, against the simulator.

Its ``runSync`` is the one RunPod client that uses ``/status-sync``: it POSTs ``/runsync?wait=`` and, while
the job is not final, follows with ``GET /status-sync/{id}?wait=``. A Node.js client working end to end is
the proof that the simulator speaks RunPod's API beyond the Python SDK.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import ROOT, SimulatorProcess, service_missing

pytestmark = pytest.mark.integration

JS = ROOT / "tests" / "js"


@pytest.fixture
def node() -> str:
    """The node binary, with the pinned SDK installed (`npm ci --prefix tests/js`, which scripts/setup runs)."""
    node = shutil.which("node")
    if node is None:
        service_missing("Node.js", "install node and npm, then run scripts/setup")
    if not (JS / "node_modules" / "runpod-sdk").is_dir():
        service_missing("RunPod's JS SDK in tests/js/node_modules", "run: npm ci --prefix tests/js")
    assert node is not None
    return node


def test_the_js_sdks_run_sync_follows_a_job_longer_than_its_wait_through_status_sync(
    node: str, simulator: SimulatorProcess
) -> None:
    endpoint = simulator.create_endpoint(cold_start_seconds=0)

    # 4 s for /runsync?wait=4000, then status-sync polls until the job ends at 5.5 s (the SDK gives up at 8 s).
    done = subprocess.run(
        [node, "run_sync.mjs", simulator.base_url, endpoint, json.dumps({"sleep": 5.5, "output": "from node"}),
         "4000"],
        cwd=JS, env={**os.environ, "RUNPOD_API_KEY": simulator.api_key}, capture_output=True, text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert (result["status"], result["output"], result["succeeded"]) == ("COMPLETED", "from node", True)
    assert result["id"].startswith("sync-") and result["executionTime"] >= 5000
    assert f"{result['id']}: COMPLETED" in done.stdout  # the answer came from a /status-sync poll
    (record,) = simulator.jobs(endpoint)
    assert record["sync"] and record["status"] == "COMPLETED"
