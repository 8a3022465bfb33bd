"""Monitoring: the audit log (and, later, metrics, usage and drift)."""
