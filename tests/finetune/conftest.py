"""Fixtures of the finetune tests: generated feature stores with a known signal."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.finetune.finetune_cohort import SignalCohort, write_signal_cohort


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny MIL models run fastest on one thread (and do not stall on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def signal_cohort(tmp_path_factory: pytest.TempPathFactory) -> SignalCohort:
    """75 slides of 30 patients with a known tumour / lymphocyte signal (see finetune_cohort.py)."""
    return write_signal_cohort(tmp_path_factory.mktemp("signal_cohort"))


@pytest.fixture(scope="session")
def small_signal_cohort(tmp_path_factory: pytest.TempPathFactory) -> SignalCohort:
    """A quick cohort (12 patients, 30 slides, 16-d features) for command and plumbing tests."""
    return write_signal_cohort(
        tmp_path_factory.mktemp("small_signal_cohort"), n_patients=12, dim=16, tiles=(10, 30)
    )
