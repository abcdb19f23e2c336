"""The credit database as a Dagster resource: where it is, and the one configuration file.

Why the URL is optional: ``dagster dev -w workspace.yaml`` on a fresh clone must work with no set-up, so
an unset URL means what every ``credits`` command does ($DATABASE_URL, else the embedded PostgreSQL under
the data folder). A deployment passes ``EnvVar("...")`` so the UI shows the variable's name, never the
URL (which may hold a password).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from ledger.config import CreditsConfig

log = logging.getLogger(__name__)

_migrated: set[str] = set()  # URLs migrated by this process (migrate is safe to repeat, just not free)
_migrate_lock = threading.Lock()


class CreditsDatabase(ConfigurableResource):
    """The PostgreSQL credit ledger the pipeline audits (and, when a run says ``live``, fixes)."""

    url: str | None = Field(
        default=None,
        description="PostgreSQL URL. Default: $DATABASE_URL, else the embedded server under the data folder. "
                    "Pass EnvVar('...') in a deployment so the URL never shows in the UI.")
    config_path: str | None = Field(
        default=None, description="credits.toml to use. Default: $CREDITS_CONFIG, else the project's credits.toml.")
    migrate: bool = Field(
        default=True, description="Apply pending sql/ migrations before the first read (as `credits audit` does).")

    _config: "CreditsConfig | None" = PrivateAttr(default=None)
    _url: str | None = PrivateAttr(default=None)

    def credits_config(self) -> "CreditsConfig":
        """The validated configuration (tiers, thresholds, the fix cap)."""
        if self._config is None:
            from ledger.config import load_config

            self._config = load_config(self.config_path)
        return self._config

    def resolve_url(self) -> str:
        """The database URL, with the embedded server started and the schema migrated when needed.

        Never log the return value: it may hold a password (use ``describe()``).
        """
        from ledger import db

        if self._url is not None:
            return self._url
        config = self.credits_config()
        url = db.resolve_url(config, self.url)
        if self.migrate and url not in _migrated:
            from ledger.migrate import migrate

            with _migrate_lock:
                if url not in _migrated:
                    with db.connect(url, autocommit=True) as conn:
                        applied = migrate(conn, config)
                    if applied:
                        log.info("applied migrations %s to %s", ", ".join(applied), db.describe_url(url))
                    _migrated.add(url)
        self._url = url
        return url

    def describe(self) -> str:
        """host:port/database, for logs and metadata."""
        from ledger import db

        return db.describe_url(self.resolve_url())
