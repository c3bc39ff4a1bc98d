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


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory):
    """One smoke run of `python -m minidalle demo`, for every test that only reads it (or copies it first):
    its folder holds dvae/, bpe/, transformer/ and clip/, samples and report.json. Trained once per session."""
    from minidalle.cli.main import main

    out = tmp_path_factory.mktemp("smoke-demo") / "run"
    assert main(["demo", "--preset", "smoke", "--out", str(out), "--json"]) == 0
    return out
