"""The Dagster code location: ``pipelines.definitions.defs``."""
