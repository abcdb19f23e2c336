"""The config file: documented defaults, validation errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ledger.config import DEFAULT_CONFIG_FILE, CreditsConfig, load_config
from ledger.errors import ConfigError


def test_documented_file_equals_the_defaults() -> None:
    assert load_config(DEFAULT_CONFIG_FILE) == CreditsConfig()


@pytest.mark.parametrize("text,key", [
    ("[tiers.pro]\nmonthly = 'lots'\nyearly = 10\n", "tiers.pro.monthly"),
    ("[tiers.pro]\nmonthly = -5\nyearly = 10\n", "tiers.pro.monthly"),
    ("[tiers.pro]\nmonthly = 5\n", "tiers.pro.yearly"),
    ("[generation_costs]\nvideo = 1.5\n", "generation_costs.video"),
    ("[free]\ndaily_limit = true\n", "free.daily_limit"),
    ("[limits]\nmax_operation_amount = 0\n", "limits.max_operation_amount"),
    ("[audit]\nmax_fixes = 'all'\n", "audit.max_fixes"),
    ("[audit]\nmax_fixe = 3\n", "audit.max_fixe"),
    ("[tiers.free]\nmonthly = 1\nyearly = 1\n", "tiers"),
    ("[database]\nservice_role = \"x; DROP TABLE y\"\n", "database.service_role"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    file = tmp_path / "credits.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(file)
    assert key in str(exc.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("tiers = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_allocation_and_costs_refuse_what_config_lacks() -> None:
    cfg = CreditsConfig()
    assert cfg.allocation("pro", "monthly") == 800
    with pytest.raises(ConfigError, match="enterprise"):
        cfg.allocation("enterprise", "monthly")
    with pytest.raises(ConfigError, match="audio"):
        cfg.generation_cost("audio")


def test_env_var_selects_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "c.toml"
    file.write_text("[free]\ndaily_limit = 9\n")
    monkeypatch.setenv("CREDITS_CONFIG", str(file))
    assert load_config().free.daily_limit == 9
