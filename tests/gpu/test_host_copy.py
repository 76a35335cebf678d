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
