"""A local stand-in for RunPod serverless: the job API under ``/v2`` plus a control API under ``/_sim``.

Clients written to RunPod's documented API (the official ``runpod`` SDK included) work against it
unchanged; point them at ``http://HOST:PORT/v2``. RunPod's management API (REST v2 and GraphQL, a
different host on RunPod) is under ``/mgmt/v2`` and ``/mgmt/graphql``.
"""

from __future__ import annotations

import logging
from types import FrameType

from jobs.simulator.app import Simulator, create_app
from jobs.simulator.config import SimulatorConfig

__all__ = ["SimulatorConfig", "create_app", "serve"]

log = logging.getLogger(__name__)

#: Seconds uvicorn waits for open requests on shutdown before cancelling them.
SHUTDOWN_GRACE_SECONDS = 3


def serve(config: SimulatorConfig, *, host: str, port: int) -> None:
    """Serve the simulator with uvicorn until interrupted. Logs the URL once, never the API key."""
    import uvicorn

    from jobs.observability import logs

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            super().handle_exit(sig, frame)
            simulator.begin_shutdown_threadsafe()

    logs.configure(for_people=False)  # unless `rpq simulator` did already
    app = create_app(config)
    simulator: Simulator = app.state.simulator
    shown_host = f"[{host}]" if ":" in host else host
    log.info("RunPod simulator serving http://%s:%d/v2 (management API at /mgmt/v2 and /mgmt/graphql, "
             "control API at /_sim)", shown_host, port)
    if config.endpoints:
        log.info("endpoints: %s", ", ".join(config.endpoints))
    else:
        log.warning("no endpoints yet: /v2 answers 404 (as RunPod does for an unknown id) until --endpoint ID "
                    "or POST /_sim/endpoints/ID creates one")
    server = Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=config.access_log,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
        )
    )
    server.run()
