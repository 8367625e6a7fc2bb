from __future__ import annotations

import pytest
from guest import GuestImage, build_guest


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_guest()
