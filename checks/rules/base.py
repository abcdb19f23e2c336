"""What a rule is: a frame derived from the user state, a GE suite over it, findings from its failures.

Each rule module defines one subclass and nothing else decides what that rule means: the CLI, the
Dagster asset checks and the tests all call ``Rule.evaluate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from checks.findings import Finding

if TYPE_CHECKING:
    import pandas as pd

    from checks.gx_adapter import GxOutcome
    from checks.snapshot import Snapshot
    from ledger.config import CreditsConfig


def opt(value: Any) -> Any:
    """None for pandas' missing markers; the value otherwise."""
    if value is None:
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT or (isinstance(value, float) and value != value):
            return None
    except ImportError:  # pragma: no cover
        pass
    return value


@dataclass(frozen=True)
class Rule:
    id: str
    severity: str  # "warning" | "critical"
    family: str  # the GE suite family: identity, funding, integrity, plausibility
    fixable: bool
    description: str

    # the columns that identify a row of this rule's frame (samples in GE summaries)
    id_columns: ClassVar[tuple[str, ...]] = ("bestauth_user_id", "user_id")
    # the user-state columns the rule's frame is built from (copied for the rows it validates), and the
    # further columns its findings read (fetched for the failing rows only)
    frame_columns: ClassVar[tuple[str, ...]] = ()
    columns: ClassVar[tuple[str, ...]] = ()
    state_rows: ClassVar[bool] = True  # the frame's index is the state's (False: a frame of its own)

    @property
    def suite_name(self) -> str:
        return f"credit_recon.{self.family}.{self.id}"

    # ---- what each rule module fills in
    def frame(self, state: "pd.DataFrame", snapshot: "Snapshot", config: "CreditsConfig") -> "pd.DataFrame":
        """The rows this rule validates (by default: every BestAuth user)."""
        return state[~state["orphan"]] if "orphan" in state.columns else state

    def expectations(self, config: "CreditsConfig", snapshot: "Snapshot | None" = None) -> list:
        raise NotImplementedError

    def findings_for(self, rows: "pd.DataFrame", failed: dict[int, list[str]], config: "CreditsConfig",
                     snapshot: "Snapshot") -> list[Finding]:
        """Turn the failing rows (with the expectations each failed) into findings."""
        raise NotImplementedError

    # ---- shared
    def evaluate(self, state: "pd.DataFrame", snapshot: "Snapshot", config: "CreditsConfig") -> "RuleResult":
        from checks.gx_adapter import validate

        t0 = time.perf_counter()
        full = state
        if self.frame_columns:  # pandas copy-on-write: selecting columns is free, only the row filter copies
            state = state[[c for c in self.frame_columns if c in state.columns]]
        frame = self.frame(state, snapshot, config)
        exps = self.expectations(config, snapshot)
        # GE sees only the columns its expectations read (plus the ids for samples): validating a
        # 50-column million-row frame costs several times a 3-column one, for the same answer
        used = [c for e in exps for c in (getattr(e, "column", None), getattr(e, "column_A", None),
                                          getattr(e, "column_B", None)) if isinstance(c, str)]
        ids = [c for c in self.id_columns if c in frame.columns]
        narrow = frame[list(dict.fromkeys(used + ids))]
        outcome = validate(narrow, self.suite_name, exps, ids)
        failed = outcome.failed_by_row()
        rows = frame.iloc[sorted(failed)] if failed else frame.iloc[0:0]
        if self.state_rows:  # the finding's other columns, read from the state for the failing rows only
            extra = [c for c in self.columns if c in full.columns and c not in rows.columns]
            if extra:
                rows = rows.join(full.loc[rows.index, extra])
        positional = {pos: failed[pos] for pos in sorted(failed)}
        findings = self.findings_for(rows.reset_index(drop=True), {i: positional[p] for i, p in enumerate(positional)},
                                     config, snapshot) if failed else []
        errors = [r.exception for r in outcome.results if r.exception]
        return RuleResult(rule=self, findings=findings, checked=outcome.checked, gx=outcome.to_summary(),
                          seconds=time.perf_counter() - t0, errors=errors, outcome=outcome)

    def finding(self, row: dict[str, Any], *, expected: Any, found: Any, fix: str | None,
                reason: str | None = None, params: dict[str, Any] | None = None) -> Finding:
        return Finding(rule=self.id, severity=self.severity, bestauth_user_id=opt(row.get("bestauth_user_id")),
                       user_id=opt(row.get("user_id")), expected=expected, found=found, fix=fix, reason=reason,
                       params=params)


@dataclass
class RuleResult:
    rule: Rule
    findings: list[Finding]
    checked: int
    gx: dict[str, Any]
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # GE expectations that raised instead of validating
    outcome: "GxOutcome | None" = field(default=None, repr=False)

    @property
    def passed(self) -> bool:
        return not self.findings and not self.errors

    def summary(self) -> dict[str, Any]:
        return {"rule": self.rule.id, "severity": self.rule.severity, "family": self.rule.family,
                "checked": self.checked, "count": len(self.findings), "passed": self.passed,
                "fixable": sum(1 for f in self.findings if f.fix), "seconds": round(self.seconds, 3),
                "errors": self.errors}
