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


@pytest.fixture(autouse=True)
def _drop_closed_log_streams():
    """A bundle's logging.conf attaches a handler to the sys.stdout of the moment (a test's capture,
    closed when that test ends); drop such handlers so a later test's log lines do not fail."""
    import logging

    yield
    for logger in [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                logger.removeHandler(handler)
