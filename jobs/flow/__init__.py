"""Moving jobs through their lifecycle: what the submit, poll and cancel tasks do (`lifecycle`), the
dispatcher and the poller that do it for an endpoint's jobs together (`dispatch`, `poller`, `batching`),
when to look again (`backoff`, `pollplan`, `endpoint_times`), the wake-up messages (`wakeups`), the
reconciler that rebuilds lost ones from the table (`reconcile`), and why a PENDING job waits (`waiting`)."""
