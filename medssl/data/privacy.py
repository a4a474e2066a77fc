"""Salted, one-way patient identifiers.

Nothing medssl writes may contain a patient's name or ID in clear text. Every identifier
(DICOM PatientID / PatientName, or a folder name for non-DICOM data) goes through
:func:`patient_hash`, a salted SHA-256 truncated to 16 hex digits. The salt is what keeps the
hash from being reversed by hashing a list of known IDs, so it is private to the user:

1. an explicit ``salt`` argument (tests, reproducible pipelines),
2. else the ``MEDSSL_SALT`` environment variable (share it across a team / cluster),
3. else a random salt created once in ``~/.config/medssl/salt`` (mode 0600).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["patient_hash", "default_salt"]

_SALT_FILE = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "medssl" / "salt"


def default_salt() -> str:
    """The salt used when none is given: ``$MEDSSL_SALT`` or a per-user random salt file."""
    env = os.environ.get("MEDSSL_SALT")
    if env:
        return env
    if not _SALT_FILE.exists():
        _SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = _SALT_FILE.with_name(f"salt.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(secrets.token_hex(16))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, _SALT_FILE)  # atomic create-if-absent: concurrent first runs agree on one salt
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return _SALT_FILE.read_text().strip()


def patient_hash(identifier: str, salt: str | None = None) -> str:
    """Return a 16-hex-digit salted hash of ``identifier`` (never the identifier itself)."""
    salt = default_salt() if salt is None else salt
    digest = hashlib.sha256(f"{salt}\x00{identifier}".encode("utf-8")).hexdigest()
    return digest[:16]
