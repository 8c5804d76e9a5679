"""Alerts: detection over stored points, the alert lifecycle, the outbox and its delivery to sinks."""
