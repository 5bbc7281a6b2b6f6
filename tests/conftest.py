"""Shared fixtures (opt-in: ``pytestmark = pytest.mark.usefixtures(...)``)."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not depend on the draw); a test's
# own @settings inherits this profile.  HYPOTHESIS_PROFILE=explore draws fresh examples.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread is faster, and robust to a CPU shared with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_data_env(tmp_path, monkeypatch):
    """recipes.data caches under tmp_path and ignores the user's LOCALOPT_DATA."""
    monkeypatch.setenv("LOCALOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOCALOPT_DATA", raising=False)
    # No test ever downloads: the official server counts as unreachable unless a test says so.
    from localopt.recipes import data
    monkeypatch.setattr(data, "_unreachable", lambda url, timeout=5.0: "offline in tests")
