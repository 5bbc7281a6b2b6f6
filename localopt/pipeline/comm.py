"""Process group set-up, point-to-point messages with timeouts, and a local launcher."""
from __future__ import annotations

import os
import pickle
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .events import Recorder

__all__ = ["PipelineError", "init_group", "Link", "launch", "destroy", "free_port",
           "under_launcher"]


def under_launcher() -> bool:
    """True when a launcher (torchrun) started this process as one rank of a job."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_PORT" in os.environ)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a local process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PipelineError(RuntimeError):
    """A pipeline step could not complete on this rank (a peer failed, died or timed out, or
    the ranks disagree on the set-up)."""


_CREATED = False   # whether build() created the default process group (destroy() undoes it)


def init_group(device: torch.device, timeout: float):
    """Initialise the default process group from torchrun's environment variables if it is not
    initialised yet (gloo on CPU, nccl on CUDA).  Returns True if this call created it."""
    global _CREATED
    if dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if k not in os.environ]
    if missing:
        raise PipelineError(
            f"localopt.pipeline: torch.distributed is not initialised and {missing} are not set: "
            "launch with `torchrun --nproc-per-node S script.py`, with "
            "localopt.pipeline.launch(fn, nprocs=S), or call torch.distributed.init_process_group "
            "before build()")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    _CREATED = True
    return True


def destroy() -> None:
    """Destroy the default process group if :func:`localopt.pipeline.build` created it."""
    global _CREATED
    if _CREATED and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED = False


class Link:
    """Non-blocking messages between the ranks of ``group``, every wait bounded by ``timeout``
    seconds; a failed or timed-out wait raises :class:`PipelineError` naming the peer rank."""

    def __init__(self, group, timeout: float, recorder: Recorder) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = timedelta(seconds=timeout)
        self.rec = recorder

    def isend(self, t: Tensor, peer: int, tag: int, stage: int, mb: int):
        with self.rec.span(stage, "send", mb):
            return (dist.isend(t, group=self.group, group_dst=peer, tag=tag), t, peer, "send")

    def irecv(self, t: Tensor, peer: int, tag: int, stage: int, mb: int):
        with self.rec.span(stage, "recv", mb):
            return (dist.irecv(t, group=self.group, group_src=peer, tag=tag), t, peer, "recv")

    def wait(self, op, stage: int, mb: int, what: str) -> Tensor:
        work, t, peer, direction = op
        t0 = time.monotonic()
        with self.rec.span(stage, "wait", mb):
            try:
                ok = work.wait(self.timeout)
            except Exception as exc:  # noqa: BLE001 -- gloo/nccl raise RuntimeError subclasses
                raise self._error(peer, direction, what, exc, time.monotonic() - t0) from exc
            if ok is False:
                raise self._error(peer, direction, what, "timed out", None)
        return t

    def _error(self, peer: int, direction: str, what: str, why, after: float | None
               ) -> PipelineError:
        verb = "receive" if direction == "recv" else "send"
        prep = "from" if direction == "recv" else "to"
        when = (f"within {self.timeout.total_seconds():g} s" if after is None else
                f"(the transfer failed after {after:.1f} s)")
        return PipelineError(
            f"localopt.pipeline: rank {self.rank} could not {verb} {what} {prep} rank {peer} "
            f"{when}: rank {peer} failed, died, or is stuck (see its own error) [{why}]")

    @staticmethod
    def done(op) -> bool:
        return op[0].is_completed()


# ---------------------------------------------------------------------------------------
# A local launcher (tests, single-machine runs without torchrun).
# ---------------------------------------------------------------------------------------
def _entry(fn, rank: int, nprocs: int, port: int, args: tuple, queue, threads) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = fn(*args)
        queue.put((rank, True, pickle.dumps(result)))   # plain bytes: no shared tensor fds
    except BaseException:  # noqa: BLE001 -- reported to the parent
        queue.put((rank, False, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        destroy()


def launch(fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), timeout: float = 600.0,
           threads: int | None = 1, grace: float = 20.0) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` fresh processes (ranks ``0..nprocs-1`` on 127.0.0.1, the
    environment torchrun would set), ``threads`` torch threads each, and return the ranks'
    results in rank order.

    ``fn`` must be importable (a module-level function); it can call
    :func:`localopt.pipeline.build`, which initialises the process group from that environment.
    All processes are joined within ``timeout`` seconds; when one fails, the others get
    ``grace`` seconds to fail on their own (a pipeline peer errors out by its timeouts), then
    everything still running is killed, and a ``RuntimeError`` reports each rank's error.
    The processes are daemonic (none outlives the caller), so ``fn`` cannot start processes of
    its own (e.g. ``DataLoader(num_workers > 0)``); use torchrun for that.

    Under torchrun (or any launcher that sets ``RANK``/``WORLD_SIZE``), the launcher has made
    the ranks already: ``launch`` steps aside and runs ``fn(*args)`` once in this process
    (returning its result at this rank's index, None at the others'); a ``nprocs`` other than
    ``WORLD_SIZE`` is an error at once.  So one script runs both ways.
    """
    import multiprocessing as mp
    import queue as queue_mod

    if under_launcher():
        world = int(os.environ["WORLD_SIZE"])
        if world != nprocs:
            raise RuntimeError(
                f"localopt.pipeline.launch: this process was started by a launcher (torchrun) "
                f"with WORLD_SIZE={world}, but launch(nprocs={nprocs}) asks for {nprocs}: start "
                f"torchrun with --nproc-per-node {nprocs}, or run without torchrun")
        results: list[Any] = [None] * nprocs   # torchrun made the ranks: run fn here, once
        try:
            results[int(os.environ["RANK"])] = fn(*args)
        finally:
            destroy()
        return results
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, nprocs, port, tuple(args), q, threads),
                         daemon=True) for r in range(nprocs)]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    failed_at = None
    try:
        while len(results) < nprocs:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + grace):
                break
            try:
                rank, ok, value = q.get(timeout=0.2)
                results[rank] = (ok, pickle.loads(value) if ok else value)
                if not ok and failed_at is None:
                    failed_at = time.monotonic()
            except queue_mod.Empty:
                pass
            for r, p in enumerate(procs):  # died without reporting (killed, os._exit)
                if r not in results and p.exitcode is not None and p.exitcode != 0:
                    time.sleep(0.2)  # its report may still be in the queue
                    try:
                        while True:
                            rank, ok, value = q.get_nowait()
                            results[rank] = (ok, pickle.loads(value) if ok else value)
                    except queue_mod.Empty:
                        pass
                    if r not in results:
                        results[r] = (False, f"rank {r} exited with code {p.exitcode} "
                                             "without reporting")
                    if failed_at is None:
                        failed_at = time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errors = [f"rank {r}: {v}" for r, (ok, v) in sorted(results.items()) if not ok]
    errors += [f"rank {r}: no result within the timeout ({timeout:g} s) -- killed"
               for r in range(nprocs) if r not in results]
    if errors:
        raise RuntimeError("localopt.pipeline.launch: " + "\n".join(errors))
    return [results[r][1] for r in range(nprocs)]
