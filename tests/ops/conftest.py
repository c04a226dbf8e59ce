"""Shared by the kernel tests."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_uncompiled_flex():
    # FlexAttention warns that it runs unfused without torch.compile, which is the CPU path of
    # these tests on purpose.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        yield
