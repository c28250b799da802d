"""Who is calling: the admin token and per-device tokens.

- The **admin token** (publish, promote, device enrolment) is given to ``registry serve`` (flag or
  environment variable); the server keeps only its sha256.
- A **device token** is ``<device id>.<secret>``, with a 256-bit random secret. The registry stores
  ``sha256(secret)`` only, so a copy of the database does not let anyone impersonate a device. The
  secret is high-entropy, so a plain (unsalted) sha256 is enough; comparisons use
  :func:`hmac.compare_digest`, and an unknown device id costs the same comparison as a known one.

Tokens travel in call metadata as ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

METADATA_KEY = "authorization"
_DUMMY_HASH = hashlib.sha256(b"no such device").hexdigest()


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the admin, or one enrolled device of one class."""

    is_admin: bool
    device_id: str = ""
    device_class: str = ""


ADMIN = Caller(is_admin=True)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def new_device_token(device_id: str) -> tuple[str, str]:
    """A fresh token for ``device_id`` and the hash to store: ``(token, sha256(secret))``."""
    secret = secrets.token_urlsafe(32)
    return f"{device_id}.{secret}", sha256_hex(secret)


def split_device_token(token: str) -> tuple[str, str] | None:
    """``"<id>.<secret>"`` -> ``(id, secret)``; None when it is not shaped like a device token."""
    device_id, sep, secret = token.rpartition(".")
    if not sep or not device_id or not secret:
        return None
    return device_id, secret


def bearer_from_metadata(metadata: tuple[tuple[str, str | bytes], ...] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() == METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def hashes_match(expected_sha256: str | None, presented: str) -> bool:
    """Constant-time check of ``sha256(presented)`` against a stored hash (None: always False)."""
    ok = hmac.compare_digest((expected_sha256 or _DUMMY_HASH).encode(), sha256_hex(presented).encode())
    return ok and expected_sha256 is not None


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token`` (client side)."""
    return ((METADATA_KEY, f"Bearer {token}"),)
