"""Seeing what rpq does: the Prometheus exporter (`metrics`), the counters workers keep for it
(`metrics_recorder`), and the job ids every log line about a job carries (`logcontext`)."""
