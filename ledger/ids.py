"""Parsing user references (BestAuth id, points id, email) before they reach SQL."""

from __future__ import annotations

import re
import uuid

from ledger.errors import InvalidArgument

# deliberately strict: one @, a dot in the domain, no spaces or quotes; stored lower-case
_EMAIL = re.compile(r"^[a-z0-9._%+\-]{1,64}@[a-z0-9\-]{1,63}(\.[a-z0-9\-]{1,63})+$")


def parse_uuid(value: object, what: str = "user id") -> uuid.UUID:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidArgument(f"{what} must be a UUID, got {_show(value)}")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise InvalidArgument(f"{what} must be a UUID, got {_show(value)}") from None


def is_uuid(value: str) -> bool:
    try:
        parse_uuid(value)
    except InvalidArgument:
        return False
    return True


def normalize_email(value: str) -> str:
    email = value.strip().lower() if isinstance(value, str) else ""
    if len(email) > 254 or not _EMAIL.match(email):
        raise InvalidArgument(f"not a valid email address: {_show(value)}")
    return email


def check_text(value: str, what: str) -> str:
    """Refuse text PostgreSQL cannot store (NUL characters, lone UTF-16 surrogates) with a clear error,
    instead of a driver error from deep inside a write."""
    if value.isascii():  # the usual case: no surrogate possible, so only NUL to refuse (no encode copy)
        if "\x00" in value:
            raise InvalidArgument(f"{what} must not contain NUL characters")
        return value
    if "\x00" in value:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode text (lone surrogate)") from None
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
