"""The one configuration file: tiers, generation costs, limits, audit thresholds.

Validated by pydantic at load so that a bad file fails before anything touches money, with an
error that names the offending key (``tiers.pro.monthly: ...``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ledger.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "credits.toml"

PositiveCredits = Annotated[int, Field(gt=0, le=10**12, strict=True)]
PAID_STATUSES = ("active", "trialing")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What happens to a period's unspent subscription credits at the period's end (issue 6):
#   "none"       they expire at the period's end;
#   N (an int)   up to N of them roll over into the next period and expire at its end (never rolled again);
#   "unlimited"  they never expire (the default: what grants did before credits had lots).
RolloverPolicy = Literal["none", "unlimited"] | Annotated[int, Field(ge=0, le=10**12, strict=True)]


class TierConfig(_Strict):
    """Credits granted per billing period, and what happens to the unspent ones at its end."""

    monthly: PositiveCredits
    yearly: PositiveCredits
    rollover: RolloverPolicy = "unlimited"


class TopUpPack(_Strict):
    """A one-off credit pack (granted as a ``top_up`` lot under its payment's key); outlives the period."""

    credits: PositiveCredits
    price_id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:-]+$")
    # days until the pack's credits expire, counted from the purchase; left out (None) = never
    expiry_days: Annotated[int, Field(gt=0, le=36_500, strict=True)] | None = None
    # consumption order: lower is spent first (subscription credits use lifecycle.grant_priority)
    priority: Annotated[int, Field(ge=0, le=1000, strict=True)] = 50


class LifecycleConfig(_Strict):
    # an upgrade mid-period grants (new allocation - old) x (time left / period length), rounded:
    #   "down" never grants a credit that was not paid for (default); "half_even" the nearest whole
    #   credit (ties to even); "up" never short-changes the customer. Rounding is cumulative per period
    #   (see ledger/proration.py): however many upgrades, the period's prorated total is off by < 1 credit.
    proration_rounding: Literal["down", "half_even", "up"] = "down"
    # consumption order of subscription credits (period grants, prorated upgrades): lower is spent first;
    # among equal priorities the soonest expiry, then the oldest lot
    grant_priority: Annotated[int, Field(ge=0, le=1000, strict=True)] = 50


def _default_top_ups() -> dict[str, TopUpPack]:
    return {
        "small": TopUpPack(credits=500, price_id="price_topup_500", expiry_days=365),
        "large": TopUpPack(credits=2500, price_id="price_topup_2500", expiry_days=365),
    }


class FreeTierConfig(_Strict):
    daily_limit: Annotated[int, Field(ge=0, le=10_000, strict=True)] = 3


class LimitsConfig(_Strict):
    # the largest single grant or deduction the SQL functions accept
    max_operation_amount: PositiveCredits = 1_000_000


class ReservationsConfig(_Strict):
    ttl_seconds: Annotated[int, Field(gt=0, le=7 * 86_400, strict=True)] = 3600


class AuditConfig(_Strict):
    max_fixes: Annotated[int, Field(ge=0, strict=True)] = 500
    failed_deductions_per_hour: Annotated[int, Field(ge=0, strict=True)] = 20
    # balance_matches_tier: a balance above this many periods' allocation is implausible
    plausible_periods: Annotated[int, Field(gt=0, strict=True)] = 3
    # free users should hold no more than this many credits
    free_max_balance: Annotated[int, Field(ge=0, strict=True)] = 0


class DatabaseConfig(_Strict):
    # role that is granted EXECUTE on the ledger functions (created by `credits migrate` if allowed)
    service_role: str = Field(default="credit_recon_service", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_max_size: Annotated[int, Field(gt=0, le=200, strict=True)] = 10
    # embedded PostgreSQL data folder; relative paths are under the project root
    data_dir: str = ".data"


def _default_tiers() -> dict[str, TierConfig]:
    return {
        "pro": TierConfig(monthly=800, yearly=9600),
        "pro_plus": TierConfig(monthly=2000, yearly=24000),
    }


class CreditsConfig(_Strict):
    tiers: dict[str, TierConfig] = Field(default_factory=_default_tiers)
    generation_costs: dict[str, PositiveCredits] = Field(default_factory=lambda: {"image": 10, "video": 100})
    free: FreeTierConfig = Field(default_factory=FreeTierConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    reservations: ReservationsConfig = Field(default_factory=ReservationsConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    top_ups: dict[str, TopUpPack] = Field(default_factory=_default_top_ups)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)

    @field_validator("top_ups")
    @classmethod
    def _pack_names(cls, packs: dict[str, TopUpPack]) -> dict[str, TopUpPack]:
        for name in packs:
            if not name.replace("_", "").isalnum() or not name.islower() or len(name) > 64:
                raise ValueError(f"top-up pack name {name!r} must be lower-case letters, digits and underscores")
        prices = [p.price_id for p in packs.values()]
        if len(prices) != len(set(prices)):
            raise ValueError("two top-up packs share a price_id")
        return packs

    @field_validator("tiers")
    @classmethod
    def _paid_tiers_only(cls, tiers: dict[str, TierConfig]) -> dict[str, TierConfig]:
        if "free" in tiers:
            raise ValueError("'free' has no credit allocation; configure it under [free]")
        for name in tiers:
            if not name.replace("_", "").isalnum() or not name.islower():
                raise ValueError(f"tier name {name!r} must be lower-case letters, digits and underscores")
        return tiers

    def allocation(self, tier: str, billing_cycle: str) -> int:
        """Credits a paid tier grants per period; ConfigError for a tier or cycle the config lacks."""
        cfg = self.tiers.get(tier)
        if cfg is None:
            raise ConfigError(f"tier {tier!r} is not in the configuration (known: {', '.join(sorted(self.tiers))})")
        if billing_cycle not in ("monthly", "yearly"):
            raise ConfigError(f"billing cycle {billing_cycle!r} is not monthly or yearly")
        return getattr(cfg, billing_cycle)

    def rollover(self, tier: str) -> str | int:
        """The tier's rollover policy: "none", "unlimited" or a cap in credits (ConfigError for an unknown tier)."""
        cfg = self.tiers.get(tier)
        if cfg is None:
            raise ConfigError(f"tier {tier!r} is not in the configuration (known: {', '.join(sorted(self.tiers))})")
        return cfg.rollover

    def top_up_pack(self, name: str) -> TopUpPack:
        try:
            return self.top_ups[name]
        except KeyError:
            raise ConfigError(
                f"top-up pack {name!r} is not in the configuration (known: {', '.join(sorted(self.top_ups)) or 'none'})"
            ) from None

    def generation_cost(self, kind: str) -> int:
        try:
            return self.generation_costs[kind]
        except KeyError:
            raise ConfigError(
                f"generation kind {kind!r} has no cost in the configuration "
                f"(known: {', '.join(sorted(self.generation_costs))})"
            ) from None

    @property
    def data_dir(self) -> Path:
        env = os.environ.get("CREDITS_DATA_DIR")
        path = Path(env) if env else Path(self.database.data_dir)
        return path if path.is_absolute() else PROJECT_ROOT / path


def _format_errors(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        parts.append(f"{key}: {err['msg']}")
    return f"invalid configuration in {source}: " + "; ".join(parts)


def load_config(path: str | os.PathLike[str] | None = None) -> CreditsConfig:
    """Load and validate the config: explicit path, else $CREDITS_CONFIG, else ./credits.toml of the project.

    A missing default file means the documented defaults; a missing explicit file is an error.
    """
    explicit = path or os.environ.get("CREDITS_CONFIG")
    file = Path(explicit) if explicit else DEFAULT_CONFIG_FILE
    if not file.exists():
        if explicit:
            raise ConfigError(f"configuration file {file} does not exist")
        return CreditsConfig()
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {file} is not valid TOML: {exc}") from None
    try:
        return CreditsConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(str(file), exc)) from None
