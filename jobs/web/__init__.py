"""The HTTP API: web apps in any language enqueue and follow jobs over JSON.

    POST /v1/jobs                       submit (202; 200 for a repeated Idempotency-Key)
    GET  /v1/jobs                       list: ?status=&endpoint=&since=&limit=&offset=&meta.KEY=
    GET  /v1/jobs/{id}                  one job
    POST /v1/jobs/{id}/cancel           cancel (409 once it has finished)
    POST /v1/jobs/{id}/retry            a new attempt (409 when not retryable)
    GET  /v1/endpoints/{name}/health    RunPod's /health counters, live
    GET  /v1/jobs/{id}/events           Server-Sent Events: started, progress, output, end|error
    POST /v1/webhooks/runpod/{token}    RunPod's webhook (the per-job token is the credential)
    GET  /healthz                       the database answers (no token)
    GET  /openapi.json, /docs           the schema and its browsable docs (no token)
    /console                            the operator console (jobs.web.console; HTML, session cookie)

`create_app()` builds the ASGI app and `serve()` runs it with uvicorn. Every /v1 route needs a
bearer token from RPQ_API_TOKENS; `new_token()` makes one and the `sha256:` line to configure. A token
carries a tenant, scopes and endpoint names (jobs.web.auth): it sees only its tenant's jobs.
"""

from jobs.web.app import create_app, serve
from jobs.web.auth import new_token

__all__ = ["create_app", "new_token", "serve"]
