"""Shared pytest setup: put the repository root on sys.path and keep torch to the CI's 2 cores."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (tiny networks gain nothing from threads, and a second thread
    on a busy 2-core machine can cost 100x), restoring the previous setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
