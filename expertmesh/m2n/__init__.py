"""The M2N between attention and expert nodes: dispatch and combine, composed of transport/ (which moves bytes)
and placement/ (which expert node computes what). lockstep.py: rounds over fixed-capacity links (links.py; dist.py:
NCCL and gloo, ipc.py: CUDA IPC), no host on the data's path. messages.py: messages over the ucx/zmq/inproc
transports, the host on the data's path."""
