"""MultiprocExecutor: attention workers and expert workers as local processes, joined by torch.distributed.

Ranks 0..A-1 are attention workers, A..A+E-1 expert workers. The engine talks to the attention workers only, over
a pipe each: one message with the step's plan, one back with its samples. Expert workers learn what is coming
from each MoE round's count exchange, and use their pipe only to report. Processes are spawned (never forked:
a forked torch with threads running can hang), and any worker's failure stops them all with its error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback

from router.engine_config import EngineConfig
from workers.config import ModelConfig
from workers.executor import Executor, WorkerError
from workers.expert_placement import ExpertPlacement
from workers.model_runner import StepPlan
from workers.sampler import SampleResult

STARTUP_TIMEOUT_S = 600.0


def placement_for(config: EngineConfig, model_config: ModelConfig) -> ExpertPlacement | None:
    if not config.expert_workers:
        return None
    if not model_config.n_routed_experts:
        raise ValueError(f"{config.model} is a dense model: it has no experts for --expert-workers")
    if config.expert_placement is not None:
        return ExpertPlacement.explicit(config.expert_placement, model_config.n_routed_experts,
                                        config.expert_workers)
    return ExpertPlacement.contiguous(model_config.n_routed_experts, config.expert_workers)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig, model_config: ModelConfig):
        A, E = config.attention_workers, config.expert_workers
        placement = placement_for(config, model_config)
        threads = config.worker_threads or max(1, (os.cpu_count() or 1) // (A + E))
        init_method = f"tcp://127.0.0.1:{free_port()}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank in range(A + E):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, name=f"moe-serve-{'attention' if rank < A else 'expert'}-{rank}",
                               args=(config, model_config, placement, rank, init_method, threads, child),
                               daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)
        self.attention, self.experts = self.conns[:A], self.conns[A:]
        try:
            infos = [self._recv(rank, STARTUP_TIMEOUT_S) for rank in range(A + E)]
        except BaseException:
            self._kill()
            raise
        self.num_blocks = tuple(info["num_blocks"] for info in infos[:A])
        self.block_size = infos[0]["block_size"]
        self.steps = 0
        self.control_s = 0.0  # step round trip minus the slowest attention worker's own time
        self.closed = False

    def execute(self, plans: list[StepPlan]) -> list[list[SampleResult]]:
        t0 = time.perf_counter()
        for conn, plan in zip(self.attention, plans):
            conn.send(("execute", plan))
        replies = [self._recv(rank) for rank in range(len(self.attention))]
        self.control_s += time.perf_counter() - t0 - max(busy for _, busy in replies)
        self.steps += 1
        return [results for results, _ in replies]

    def profile(self) -> dict:
        """Every worker's cumulative time split: {"attention": [...], "experts": [...], "steps", "control_s"}."""
        for conn in self.attention:
            conn.send(("report",))
        attention = [self._recv(rank) for rank in range(len(self.attention))]
        A = len(self.attention)
        experts = [self._recv(A + i, timeout=60) for i in range(len(self.experts))]
        return {"steps": self.steps, "control_s": self.control_s, "attention": attention, "experts": experts}

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            for conn in self.attention:
                conn.send(("stop",))
            for rank in range(len(self.attention)):
                self._recv(rank, timeout=30)
            for proc in self.procs:
                proc.join(timeout=30)
        except (WorkerError, OSError):
            pass
        finally:
            self._kill()

    def _recv(self, rank: int, timeout: float | None = None):
        """The worker's reply; a WorkerError (and every worker stopped) if it failed or died."""
        conn, proc = self.conns[rank], self.procs[rank]
        while not conn.poll(1.0 if timeout is None else min(1.0, timeout)):
            if not proc.is_alive():
                self._fail(f"{proc.name} exited (code {proc.exitcode})")
            if timeout is not None:
                timeout -= 1.0
                if timeout <= 0:
                    self._fail(f"{proc.name} did not answer in time")
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            self._fail(f"{proc.name} exited (code {proc.exitcode})")
        if kind == "error":
            self._fail(f"{proc.name}: {payload}")
        return payload

    def _fail(self, message: str):
        self.closed = True
        self._kill()
        raise WorkerError(message)

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def build_worker(config: EngineConfig, model_config: ModelConfig, placement: ExpertPlacement | None, rank: int,
                 init_method: str, threads: int):
    """Rank `rank`'s worker, an AttentionWorker or an ExpertWorker, once every rank has joined the groups at
    init_method (tcp://host:port). Only in a process of its own (a worker process or actor): it freezes the heap."""
    import torch

    from workers.attention_worker import AttentionWorker
    from workers.config import resolve_device
    from workers.expert_worker import ExpertWorker
    from workers.gc_freeze import freeze_startup_heap
    from workers.parallel_groups import init_parallel_groups

    torch.set_num_threads(threads)
    A, E = config.attention_workers, config.expert_workers
    groups = init_parallel_groups(rank, A, E, init_method, resolve_device(config.device))
    worker = (ExpertWorker if rank >= A else AttentionWorker)(config, model_config, groups, placement)
    freeze_startup_heap()  # the process serves this worker until it exits
    return worker


def worker_main(config: EngineConfig, model_config: ModelConfig, placement: ExpertPlacement | None, rank: int,
                init_method: str, threads: int, conn) -> None:
    """A worker process: build the worker, then serve the engine (attention) or the rounds (expert)."""
    try:
        worker = build_worker(config, model_config, placement, rank, init_method, threads)
        conn.send(("ok", worker.info()))
        if rank >= config.attention_workers:
            worker.serve(lambda stats: conn.send(("ok", stats)))
            return
        while True:
            method, *args = conn.recv()
            conn.send(("ok", getattr(worker, method)(*args)))
            if method == "stop":
                return
    except (EOFError, KeyboardInterrupt):
        return  # the engine went away
    except BaseException as e:  # noqa: BLE001 - reported to the engine, which stops every worker
        try:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"))
        except OSError:
            pass
