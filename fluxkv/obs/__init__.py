"""Observability: Prometheus metrics, OpenTelemetry tracing, logs, the admin HTTP port, profiles."""
