"""RayExecutor: the attention and expert workers of one model instance as Ray actors, placed across nodes.

MultiprocExecutor's contract (ranks 0..A-1 attention, A..A+E-1 experts; the engine talks to the attention ranks
only), with Ray for the processes:
- placement: a placement group per pool, strategy PACK (ranks share a node while they fit), a bundle per worker
  of its pool's resources (`WorkerPools`); torch gets a thread per CPU of the bundle;
- rendezvous: rank 0 gives its node's IP and a free port there, and every rank joins the torch.distributed
  groups at tcp://ip:port, so the groups span nodes;
- failure: each expert serves its rounds in one long call, whose end says it stopped; a worker that fails or dies
  has every worker killed, and WorkerError raised naming it (the dead one, when one died).
Actors are named `<name>/attention-<rank>` and `<name>/expert-<index>` in the namespace "moe-serve", placement
groups `<name>/attention` and `<name>/expert`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.worker_actor import WorkerActor
from router.engine_config import EngineConfig
from workers.config import ModelConfig
from workers.executor import Executor, WorkerError
from workers.model_runner import StepPlan
from workers.multiproc_executor import STARTUP_TIMEOUT_S, placement_for
from workers.sampler import SampleResult

NAMESPACE = "moe-serve"
DEATH_GRACE_S = 2.0  # after a failure, how long to look for a dead worker behind it
REPORT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class WorkerPools:
    """Ray resources for each worker of a pool, e.g. {"CPU": 1}: "CPU", "GPU", and custom resources, which pin a
    pool to the nodes that have them."""
    attention: dict
    expert: dict


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, model_config: ModelConfig, pools: WorkerPools, name: str):
        A, E = config.attention_workers, config.expert_workers
        self.names = [f"{name}/attention-{r}" for r in range(A)] + [f"{name}/expert-{i}" for i in range(E)]
        self.groups: dict = {}  # pool -> its placement group
        self.actors: list = []
        self.serving: dict = {}  # each expert's serve() call -> its rank
        self.closed = False
        try:
            self._place(name, pools, A, E)
            threads = [config.worker_threads or max(1, int(r.get("CPU", 1)))
                       for r in [pools.attention] * A + [pools.expert] * E]
            init_method = f"tcp://{self._rendezvous()}"
            placement = placement_for(config, model_config)
            infos = self._get([actor.start.remote(config, model_config, placement, rank, init_method, threads[rank])
                               for rank, actor in enumerate(self.actors)], range(A + E), STARTUP_TIMEOUT_S)
        except BaseException:
            self.shutdown()
            raise
        self.serving = {actor.serve.remote(): A + i for i, actor in enumerate(self.actors[A:])}
        self.num_blocks = tuple(info["num_blocks"] for info in infos[:A])
        self.block_size = infos[0]["block_size"]
        self.steps = 0
        self.control_s = 0.0  # step round trip minus the slowest attention worker's own time

    def execute(self, plans: list[StepPlan]) -> list[list[SampleResult]]:
        t0 = time.perf_counter()
        replies = self._get([actor.execute.remote(plan) for actor, plan in zip(self.actors, plans)],
                            range(len(plans)))
        self.control_s += time.perf_counter() - t0 - max(busy for _, busy in replies)
        self.steps += 1
        return [results for results, _ in replies]

    def profile(self) -> dict:
        """Every worker's cumulative time split: {"attention": [...], "experts": [...], "steps", "control_s"}."""
        A = self.num_ranks
        attention = self._get([actor.report.remote() for actor in self.actors[:A]], range(A))
        experts = self._get([actor.reported.remote(REPORT_TIMEOUT_S) for actor in self.actors[A:]],
                            range(A, len(self.actors)))
        return {"steps": self.steps, "control_s": self.control_s, "attention": attention, "experts": experts}

    def shutdown(self) -> None:
        """Kills every worker and frees their placement groups."""
        if self.closed:
            return
        self.closed = True
        for actor in self.actors:
            ray.kill(actor)
        for group in self.groups.values():
            remove_placement_group(group)

    def _place(self, name: str, pools: WorkerPools, A: int, E: int) -> None:
        """Reserves each pool's bundles, then starts an actor in each bundle."""
        wanted = {kind: (count, resources) for kind, count, resources in
                  (("attention", A, pools.attention), ("expert", E, pools.expert)) if count}
        for kind, (count, resources) in wanted.items():
            self.groups[kind] = placement_group([dict(resources)] * count, strategy="PACK", name=f"{name}/{kind}")
        for kind, group in self.groups.items():
            try:
                ray.get(group.ready(), timeout=STARTUP_TIMEOUT_S)
            except GetTimeoutError:
                count, resources = wanted[kind]
                raise WorkerError(f"the cluster found no room for {count} {kind} workers of {resources} each in "
                                  f"{STARTUP_TIMEOUT_S:.0f} s") from None
        for rank, actor_name in enumerate(self.names):
            kind, bundle = ("attention", rank) if rank < A else ("expert", rank - A)
            resources = wanted[kind][1]
            self.actors.append(WorkerActor.options(
                name=actor_name, namespace=NAMESPACE, max_concurrency=1 if kind == "attention" else 2,
                num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
                resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.groups[kind],
                                                                     placement_group_bundle_index=bundle),
            ).remote())

    def _rendezvous(self) -> str:
        """host:port for the torch.distributed rendezvous, on rank 0's node."""
        node, port = self._get([self.actors[0].node.remote(), self.actors[0].free_port.remote()], (0, 0),
                               STARTUP_TIMEOUT_S)
        return f"{node['ip']}:{port}"

    def _get(self, refs: list, ranks: Sequence[int], timeout: float | None = None) -> list:
        """The results of calls refs[i] on workers ranks[i]; a WorkerError, every worker killed, if a worker fails
        or dies first (an expert whose serve() ends included), or the calls take longer than timeout."""
        owners = {**dict(zip(refs, ranks)), **self.serving}
        pending = list(refs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(pending + list(self.serving), num_returns=1, timeout=left)
            if not ready:
                self._fail(f"{', '.join(self.names[owners[r]] for r in pending)} did not answer in {timeout:.0f} s")
            (ref,) = ready
            try:
                ray.get(ref)
            except RayError as e:
                self._fail(self._diagnose(owners, ref, e))
            if ref in self.serving:
                self._fail(f"{self.names[owners[ref]]} stopped serving the all-to-all rounds")
            pending.remove(ref)
        return ray.get(refs)

    def _diagnose(self, owners: dict, ref, error: RayError) -> str:
        """What failed, naming the worker. A worker's death explains the others' errors (their peer went away),
        so a dead worker is looked for, briefly, and named first."""
        failures = {ref: error}
        others = [r for r in owners if r != ref]
        deadline = time.monotonic() + DEATH_GRACE_S
        while others and not any(isinstance(e, RayActorError) for e in failures.values()):
            ready, others = ray.wait(others, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                ray.get(ready[0])
            except RayError as e:
                failures[ready[0]] = e
        dead = [r for r, e in failures.items() if isinstance(e, RayActorError)]
        culprit = dead[0] if dead else ref
        return describe(self.names[owners[culprit]], failures[culprit])

    def _fail(self, message: str):
        self.shutdown()
        raise WorkerError(message)


def describe(worker: str, error: RayError) -> str:
    if isinstance(error, RayActorError):
        reason = str(error).strip().splitlines()[-1]  # e.g. "... it was killed by `ray.kill`." or its node died
        return f"worker {worker} died: {reason}"
    if isinstance(error, RayTaskError):
        return f"worker {worker} failed: {type(error.cause).__name__}: {error.cause}"
    return f"worker {worker} failed: {error}"
