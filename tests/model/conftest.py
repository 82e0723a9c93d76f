"""Fixtures shared by the model tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Correctness tests run with one intra-op thread: results do not depend on the thread count, and on shared,
    oversubscribed CI cores two spinning OpenMP threads made a 64-token greedy run ~20x slower (measured), and
    threaded TP shards oversubscribed the cores. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
