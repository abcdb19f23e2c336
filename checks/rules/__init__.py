"""The contract's rules, one module each, in contract order: ``RULES["ledger_integrity"]`` etc.; then
the credit-lifecycle rules of issue 6 (family "lifecycle")."""

from __future__ import annotations

from checks.rules import (
    balance_matches_tier,
    duplicate_grants,
    expiry_applied,
    failed_deductions,
    ledger_integrity,
    lots_consistent,
    mapping_present,
    metadata_resolved,
    paid_users_funded,
    plan_change_grants,
    refunds_bounded,
)
from checks.rules.base import Rule, RuleResult

RULES: dict[str, Rule] = {m.RULE.id: m.RULE for m in (
    mapping_present, metadata_resolved, paid_users_funded, ledger_integrity, duplicate_grants,
    balance_matches_tier, failed_deductions,
    expiry_applied, lots_consistent, refunds_bounded, plan_change_grants)}

RULE_IDS: tuple[str, ...] = tuple(RULES)

__all__ = ["RULES", "RULE_IDS", "Rule", "RuleResult"]
