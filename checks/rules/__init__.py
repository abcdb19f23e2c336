"""The contract's rules, one module each, in contract order: ``RULES["ledger_integrity"]`` etc."""

from __future__ import annotations

from checks.rules import (
    balance_matches_tier,
    duplicate_grants,
    failed_deductions,
    ledger_integrity,
    mapping_present,
    metadata_resolved,
    paid_users_funded,
)
from checks.rules.base import Rule, RuleResult

RULES: dict[str, Rule] = {m.RULE.id: m.RULE for m in (
    mapping_present, metadata_resolved, paid_users_funded, ledger_integrity, duplicate_grants,
    balance_matches_tier, failed_deductions)}

RULE_IDS: tuple[str, ...] = tuple(RULES)

__all__ = ["RULES", "RULE_IDS", "Rule", "RuleResult"]
