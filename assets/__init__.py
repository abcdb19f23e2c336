"""Dagster assets over checks/: snapshots, the credit state with its rule checks, findings, fixes, report.

Thin wrappers: every number comes from checks/ (the same code `credits audit` runs).
"""

from assets.audit import findings, fix_plan, health_report
from assets.credit_state import credit_rules, credit_state
from assets.expiry import ExpireCreditsConfig, expired_credits
from assets.fixes import ApplyFixesConfig, applied_fixes
from assets.partitions import daily_partitions
from assets.resources import CreditsDatabase
from assets.snapshots import table_snapshots

AUDIT_ASSETS = [table_snapshots, credit_state, findings, fix_plan, health_report]
FIX_ASSETS = [applied_fixes]
EXPIRY_ASSETS = [expired_credits]  # the daily expiry sweep (writes `expiry` rows); runs before the audit
ALL_ASSETS = [*AUDIT_ASSETS, *FIX_ASSETS, *EXPIRY_ASSETS]
ASSET_CHECKS = [credit_rules]

__all__ = ["ALL_ASSETS", "ASSET_CHECKS", "AUDIT_ASSETS", "EXPIRY_ASSETS", "FIX_ASSETS", "ApplyFixesConfig",
           "CreditsDatabase", "ExpireCreditsConfig", "applied_fixes", "credit_rules", "credit_state",
           "daily_partitions", "expired_credits", "findings", "fix_plan", "health_report", "table_snapshots"]
