"""Shared fixtures. Every test here runs on CPU in seconds unless its name says otherwise."""
import os

# Ray and DeepSpeed on one box: stay on loopback (DESIGN.md section 7). Set before any import.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")

import pytest

from spiral_rl.config import load_config


@pytest.fixture
def cfg():
    return load_config([])


@pytest.fixture
def world_cfg(cfg):
    return cfg.world
