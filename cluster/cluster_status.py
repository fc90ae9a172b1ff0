"""ClusterStatus: what `moe-serve status` shows of a running cluster. The Serve applications and their deployments'
replica states, each engine replica's cache (as posted to the status board), and the moe-serve actors on each node:
the Serve replicas and the attention and expert workers (`moe-serve/<replica>/attention-<rank>`, `.../expert-<i>`).
"""

from __future__ import annotations

from dataclasses import dataclass

from router.engine_stats import EngineStats

APP = "moe-serve"


@dataclass(frozen=True)
class ClusterStatus:
    applications: dict  # name -> serve.status()'s ApplicationStatusOverview
    engines: dict[str, tuple[str, EngineStats]]  # replica -> (node id, stats)
    nodes: dict[str, str]  # node id -> its address
    actors: dict[str, list[str]]  # node id -> names of the moe-serve actors alive on it
    actors_error: str | None = None  # why the actors could not be listed

    @classmethod
    def collect(cls) -> ClusterStatus:
        """From the Ray cluster this process is connected to."""
        import ray
        from ray import serve
        from ray.util.state import list_actors
        from ray.util.state.exception import RayStateApiException

        from cluster.status_board import read_board

        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
        actors: dict[str, list[str]] = {}
        error = None
        try:
            for a in list_actors(ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")],
                                 limit=10_000):
                if a.name and (a.name.startswith(f"{APP}/") or f"::{APP}#" in a.name):
                    actors.setdefault(a.node_id, []).append(a.name)
        except RayStateApiException as e:
            error = f"unavailable ({str(e).splitlines()[0]})"
        return cls(serve.status().applications, read_board(), nodes, actors, error)

    def render(self) -> str:
        lines = []
        for name, app in self.applications.items():
            lines.append(f"Serve application '{name}': {app.status.value}")
            for dep_name, dep in app.deployments.items():
                states = ", ".join(f"{n} {state}" for state, n in sorted(dep.replica_states.items()))
                lines.append(f"  {dep_name}: {dep.status.value}, replicas: {states or 'none'}")
        if not self.applications:
            lines.append("No Serve application is running.")
        lines.append("Engine replicas:" if self.engines else "Engine replicas: none has reported yet")
        for replica, (node, s) in sorted(self.engines.items()):
            lines.append(f"  {replica} on {self.nodes.get(node, node[:8])}: {s.running} running, {s.waiting} waiting, "
                         f"KV cache {s.kv_usage:.1%} of {s.num_blocks} blocks x {s.block_size} tokens, prefix hits "
                         f"{s.prefix_hit_rate:.1%}, {s.num_preemptions} preemptions")
        lines.append(f"Actors by node: {self.actors_error}" if self.actors_error else "Actors by node:")
        for node, names in sorted(self.actors.items()):
            lines.append(f"  {self.nodes.get(node, '?')} (node {node[:8]}):")
            lines += [f"    {n}" for n in sorted(names)]
        return "\n".join(lines)
