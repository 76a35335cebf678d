"""The M2N between attention and expert nodes without the host on the data's path: lockstep rounds
(lockstep.py) over torch.distributed point-to-point links (dist.py). The message-based M2N over ucx/zmq is
transport/m2n.py."""
