"""Host -> device index copies (expertmesh.host_copy) queued behind running kernels arrive intact."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def test_host_to_device_copies_arrive_intact_without_a_host_wait():
    from expertmesh.host_copy import to_device
    slow = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        slow = slow @ slow / 64  # keeps the stream busy while the copies are queued behind it
    copies = [to_device(list(range(i, i + 1000)), "cuda") for i in range(50)]
    torch.cuda.synchronize()
    assert all(c.device.type == "cuda" and c.tolist() == list(range(i, i + 1000)) for i, c in enumerate(copies))


def test_several_tables_in_one_copy_arrive_intact_without_a_host_wait():
    """to_device_all, as a step's metadata goes: tables of mixed dtypes and odd sizes, one copy, no host sync, each
    staging buffer kept until its copy ran although the next batch is packed at once."""
    import numpy as np
    from expertmesh.host_copy import to_device_all
    slow = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        slow = slow @ slow / 64
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [to_device_all([np.arange(i, i + 7, dtype=np.int32).reshape(7, 1), list(range(i, i + 13)),
                                  torch.full((3,), i, dtype=torch.int64), np.zeros(0, dtype=np.int64)], "cuda")
                   for i in range(50)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for i, (table, ids, full, empty) in enumerate(batches):
        assert table.dtype == torch.int32 and table.shape == (7, 1) and table.flatten().tolist() == list(range(i, i + 7))
        assert ids.dtype == torch.int64 and ids.tolist() == list(range(i, i + 13))
        assert full.tolist() == [i] * 3 and empty.numel() == 0 and table.device.type == "cuda"


def test_a_graphs_inputs_refilled_in_place_arrive_intact_without_a_host_wait():
    """copy_into, as a CUDA graph's static inputs are loaded each step: the same device buffer refilled while
    the kernels before are still running, each step's staging kept until its copy ran."""
    import numpy as np
    from expertmesh.host_copy import copy_into, to_device_buffer
    buffer, (table, ids) = to_device_buffer([np.zeros((7, 3), dtype=np.int32), [0] * 5], "cuda")
    slow = torch.randn(4096, 4096, device="cuda")
    seen = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(50):
            for _ in range(2):
                slow = slow @ slow / 64
            copy_into([np.full((7, 3), i, dtype=np.int32), list(range(i, i + 5))], buffer)
            seen.append(torch.cat([table.flatten().long(), ids]).sum())  # read by the device, after the copy
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [s.item() for s in seen] == [21 * i + 5 * i + 10 for i in range(50)]
