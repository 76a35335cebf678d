"""Async scheduling on a GPU (tests/unit/test_async_scheduling.py's check): every node in this process on cuda:0
with CUDA graphs, float32, colocated and disaggregated (2 microbatches over in-process messages); the held tokens
are read on the device by the next step's inputs, graph replays included; prompts prefilled in chunks of a
4-token budget give the tokens of prompts fed whole."""
import pytest

from tests.unit.test_async_scheduling import check_async_against_sync

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("expert_nodes, max_batch_tokens", [(0, 4096), (2, 4096), (2, 4)],
                         ids=["colocated", "disaggregated", "chunked"])
def test_async_scheduling_gives_what_the_synchronous_engine_gives_on_a_gpu(mixtral_dir, expert_nodes,
                                                                           max_batch_tokens):
    check_async_against_sync(mixtral_dir, expert_nodes, None, "cuda", max_batch_tokens)
