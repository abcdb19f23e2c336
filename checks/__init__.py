"""The audit engine: consistent snapshots, one module per rule (GE suites), findings, fixes, reports.

Imports ledger; never Dagster. Great Expectations is imported lazily (only where a rule validates).
"""
