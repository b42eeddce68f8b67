"""Fixtures of the hostile battery: the world of templates, built once per session."""

from __future__ import annotations

import pytest

from .world import World, build_world


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("hostile-world"))
