"""A process that does what a one-GPU attention node does while its expert node computes at m = 1: one warp polls a
flag in device memory (the ipc links' round wait, expertmesh/m2n/ipc.py). Run beside `bench layer` under CUDA MPS to
see whether the poll slows the experts (RESULTS.md, thirteenth session). Writes --ready once the poll is on the
GPU; SIGTERM or SIGINT releases it from a stream of its own, as IpcLinks.release does, and the process exits."""
from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

import torch

from expertmesh.m2n import cuda_driver as cu
from expertmesh.m2n.ipc import _RELEASED, _wait


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ready", required=True, help="file written once the poll kernel is running")
    args = p.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    counts = torch.zeros(2, dtype=torch.int64, device="cuda")  # [flag, taken]
    _wait[(1,)](counts[0:1], counts[1:2], num_warps=1)  # waits for message 1, which never comes: it polls
    release = cu.stream_create_non_blocking()
    Path(args.ready).write_text("polling\n")
    stop.wait()
    cu.stream_write_value(release, counts.data_ptr(), _RELEASED)
    torch.cuda.synchronize()
    print(f"poll released: flag {counts[0].item()}, taken {counts[1].item()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
