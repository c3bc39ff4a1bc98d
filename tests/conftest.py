"""Fixtures shared by the unit tests (the repo-root conftest.py sets the smoke switch)."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models: extra threads only add start-up cost. Restored after, so other tests are unaffected."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
