"""What every expertmesh process shares at its boundary: logging, uvloop, clean exit on SIGTERM.

An exception escaping a node's main coroutine becomes a logged error and exit code 1."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

import torch

from .config import Config

# A transport's socket thread (transport/zmq.py) needs the GIL to hand a message to or from the event loop; at the
# interpreter's default 5 ms switch interval it waited that long while the loop's thread computed, and the nodes'
# phases counted the wait as host work (dispatch 2-5 ms where its work is 0.3 ms: benchmarks/RESULTS.md, issue 14).
SWITCH_INTERVAL_S = 0.0002


def before_cuda_starts(config: Config, role: str, index: int) -> None:
    """The environment CUDA reads when it starts in this node (which torch.cuda.set_device does): eager module
    loading where a link needs it (m2n/link_plan.py), and under MPS this role's share of the SMs."""
    from .m2n.link_plan import needs_eager_loading
    if needs_eager_loading(config, role, index):
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"
    share = config.cluster.sm_percent(role)
    if share is not None:
        os.environ["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(share)


def node_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="cluster config JSON written by the launcher")
    parser.add_argument("--index", type=int, default=0, help="which node of its role this process is")
    return parser.parse_args()


def run_node(name: str, main: Callable[[Config, int], Awaitable[None]]) -> None:
    """Parses --config/--index, runs main(config, index) on uvloop, exits 0 on SIGTERM/SIGINT, 1 on error."""
    args = node_args(f"expertmesh {name}")
    # EXPERTMESH_LOG_LEVEL=DEBUG: each lockstep step's plan, enqueueing and end, per node (a hang's last step)
    logging.basicConfig(level=os.environ.get("EXPERTMESH_LOG_LEVEL", "INFO").upper(),
                        format=f"%(asctime)s {name}[{args.index}] %(levelname)s %(message)s")
    log = logging.getLogger(name)

    async def guarded() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        config = Config.load(args.config)
        torch.set_num_threads(config.model.torch_threads)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        await main(config, args.index)

    try:
        import uvloop
        uvloop.run(guarded())
    except asyncio.CancelledError:
        log.info("stopped")
    except Exception:
        log.exception("failed")
        sys.exit(1)
