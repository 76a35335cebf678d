"""UCX's process-wide state for expertmesh: the options we ask UCX for, and one ucxx context per event loop
with its progress (a thread, or the event loop polling). ucx.py builds links and the transport on top."""
from __future__ import annotations

import asyncio
import os
import threading

import torch

from .base import TransportError

_CPU_TLS = "tcp,sm,self"  # UCX's listener (sockaddr connection manager) needs tcp; sm serves peers on one host
_CUDA_TLS = "tcp,cuda_copy,cuda_ipc,sm,self"
_CUDA_RNDV_THRESH = "8192"

PROGRESS_MODES = ("thread", "polling")  # who progresses the UCX worker: see LoopContext


def ucx_options(device: torch.device, ucx_tls: str | None) -> dict[str, str]:
    """The UCX configuration this backend asks for, fixed when the event loop's UCX context starts.

    Operators tune UCX with its own UCX_* environment variables: an explicit `ucx_tls` wins, then UCX_TLS
    from the environment, then our default for the device. On CUDA, rendezvous (zero-copy cuda_ipc) starts at
    8 KB unless UCX_RNDV_THRESH says otherwise: on 2 x H200 it halved decode-size M2N rounds (256 tokens x 4096
    bf16: 1.81 -> 0.90 ms) and 1 MB messages (580 -> 390 us), benchmarks/RESULTS.md."""
    options = {}
    if "UCX_TCP_CM_REUSEADDR" not in os.environ:  # a restarted node listens on its port again at once, not after
        options["TCP_CM_REUSEADDR"] = "y"  # the old connections' TIME_WAIT (the launcher restarts dead nodes)
    if device.type == "cuda" and "UCX_RNDV_THRESH" not in os.environ:
        options["RNDV_THRESH"] = _CUDA_RNDV_THRESH
    if ucx_tls is not None:
        options["TLS"] = ucx_tls
    elif "UCX_TLS" not in os.environ:
        options["TLS"] = _CUDA_TLS if device.type == "cuda" else _CPU_TLS
    return options


def import_ucxx() -> None:
    """Import ucxx, or say that it is missing; UCX reads its global options when its library loads, here."""
    # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and would warn about in every process.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    try:
        import ucxx  # noqa: F401
        from ucxx._lib_async import application_context
    except ImportError as exc:
        raise TransportError(f"transport backend 'ucx' needs the ucxx package (pip install ucxx-cu13): "
                             f"{exc}") from exc
    # Every ucxx context's finalizer clears ucxx's progress registry for *all* event loops: collecting an old
    # context could orphan a live one's progress, and ucxx would then start a second one. LoopContext.shutdown
    # unregisters its own loop instead, so the contexts made from here on get a finalizer that does nothing.
    application_context.clear_progress_tasks = lambda: None


class LoopContext:
    """The ucxx ApplicationContext of one event loop, shared by every UcxTransport used on that loop.

    ucxx keeps one progress task per event loop (a second context on the same loop would never progress), and
    its request futures belong to the loop that created the context: hence one per loop, released when its
    last listener or connection closes. Progress, as UcxTransport's `progress_mode` says:
    - "thread": a progress thread blocking on the worker's epoll fd plus ucxx's notifier thread resolving
      asyncio futures (without the notifier, every pending recv spins the event loop: ucxx's wait_yield).
      Idle processes sleep; each completion crosses two threads to reach the loop.
    - "polling": the event loop itself calls worker.progress() between its other callbacks and each pending
      request checks its completion on every turn (no extra threads, no futures): the lowest latency, and
      one core busy for as long as the context lives, idle or not.
    ucxx's "blocking" mode is left out: it has no notifier either, so pending requests spin just as in polling."""

    def __init__(self, loop: asyncio.AbstractEventLoop, options: dict[str, str], progress_mode: str) -> None:
        from ucxx._lib_async import ApplicationContext
        self.loop = loop
        self.options = options
        self.progress_mode = progress_mode
        self.users = 0
        threaded = progress_mode == "thread"
        # Python futures need the notifier thread, which only the thread modes run (ucxx would warn and fall
        # back to wait_yield); delayed submission needs the progress thread.
        self.ctx = ApplicationContext(options, progress_mode=progress_mode, enable_python_future=threaded,
                                      enable_delayed_submission=threaded)
        from ucxx._lib_async.application_context import ProgressTasks
        self.progress = ProgressTasks[loop]  # registered by the context for this loop

    def shutdown(self) -> None:
        from ucxx._lib_async.application_context import ProgressTasks
        if self.progress_mode == "thread":
            self._stop_threads()
        ProgressTasks.pop(self.loop, None)  # ucxx's per-loop registry: let the next context progress
        if not self.loop.is_closed():
            # Polling, the loop's own progress task holds the worker and keeps a core busy: stop it. (A loop
            # already closed cancelled it itself: ucxx wraps loop.close. The thread mode has no tasks.)
            for task in self.progress._tasks:
                task.cancel()

    def _stop_threads(self) -> None:
        from ucxx._lib.libucxx import PythonRequestNotifierWaitState
        worker = self.ctx.worker
        worker.stop_progress_thread()  # first, so that no request completes behind the notifier's back
        worker.stop_request_notifier_thread()  # wakes the notifier now instead of after its 1 s poll
        self.ctx.stop_notifier_thread()
        # The notifier's state machine may be left "running" (a stop seen between two waits) or "ready" (a
        # completion, e.g. of a recv cancelled by a closing endpoint, after its last wait); the worker's
        # destructor would warn about either. Settle both on this thread, then stop for good.
        worker.wait_request_notifier(period_ns=1)
        while worker.wait_request_notifier(period_ns=1) == PythonRequestNotifierWaitState.Ready:
            worker.run_request_notifier()
        worker.stop_request_notifier_thread()


_CONTEXTS: dict[asyncio.AbstractEventLoop, LoopContext] = {}
_CONTEXTS_LOCK = threading.Lock()
_exit_hook_registered = False


def _shutdown_all_at_exit() -> None:
    # The notifier thread is not a daemon: a process that never closed its connections would hang at exit.
    with _CONTEXTS_LOCK:
        contexts = list(_CONTEXTS.values())
        _CONTEXTS.clear()
    for context in contexts:
        context.shutdown()


def acquire_context(options: dict[str, str], progress_mode: str) -> LoopContext:
    global _exit_hook_registered
    loop = asyncio.get_running_loop()
    with _CONTEXTS_LOCK:
        context = _CONTEXTS.get(loop)
        if context is None:
            if not _exit_hook_registered:
                threading._register_atexit(_shutdown_all_at_exit)  # runs before non-daemon threads are joined
                _exit_hook_registered = True
            context = _CONTEXTS[loop] = LoopContext(loop, options, progress_mode)
        elif (context.options, context.progress_mode) != (options, progress_mode):
            raise TransportError(f"this event loop already runs UCX with options {context.options} in progress "
                                 f"mode {context.progress_mode!r}; a second ucx transport asked for {options} in "
                                 f"{progress_mode!r} (one UCX context per event loop)")
        context.users += 1
        return context


def release_context(context: LoopContext) -> None:
    with _CONTEXTS_LOCK:
        context.users -= 1
        if context.users > 0:
            return
        _CONTEXTS.pop(context.loop, None)
    context.shutdown()
