"""Shared fixtures: tiny phantoms made once per session, and the real data folder when present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SALT = "medssl-tests"


@pytest.fixture(autouse=True)
def _salt(monkeypatch):
    # a fixed salt: tests are reproducible and never write ~/.config/medssl/salt
    monkeypatch.setenv("MEDSSL_SALT", SALT)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """Two small phantom cases (one with a lesion) in every format."""
    from medssl.data.synthetic import make_phantoms

    return make_phantoms(tmp_path_factory.mktemp("phantoms"), n_cases=2, seed=0, shape=(40, 36, 20),
                         spacing=(8.0, 8.0, 10.0), progress=False)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared data not available (../shared/data)")
    return SHARED_DATA
