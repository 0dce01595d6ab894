"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny matrices: one thread is as fast as two, and far faster when another process keeps a core busy.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
