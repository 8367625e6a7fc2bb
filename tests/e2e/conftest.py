from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from asuser import build_user_venv, private_dir
from guest import GuestImage, build_guest


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()


@pytest.fixture(scope="session")
def user_venv() -> Iterator[Path]:
    """tapd's clients installed as a host gives them to its users: a venv of
    the system's Python, readable by all, without the daemon's dependencies."""
    where = private_dir("tapd-e2e-venv-")
    try:
        yield build_user_venv(where)
    finally:
        shutil.rmtree(where, ignore_errors=True)
