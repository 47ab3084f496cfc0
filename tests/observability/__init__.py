"""Tests of metrics, health endpoints, dashboards and alert rules against a real Prometheus."""
