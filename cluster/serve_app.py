"""The Ray Serve application: an Ingress (HTTP and gRPC) over EngineServer replicas, each a whole model instance,
routed by LeastWorkRouter and autoscaled by Serve on ongoing requests.

    serve run cluster.serve_app:app_builder model=/path/to/checkpoint engine_replicas=2

gRPC goes through Serve's gRPC proxy: start Serve with `grpc_options()` (the MoeServe servicer registered).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from router.engine_config import EngineConfig

# Ray Serve's own throughput settings (what its RAY_SERVE_THROUGHPUT_OPTIMIZED sets, less direct ingress, which
# drops the proxies): gRPC between the proxy and the deployments, user code and request routing on the replica's
# event loop, request-path logs buffered. Read by every Serve process as it starts, so they go in the environment
# of the Ray they run in: `moe-serve up` sets them for a Ray it starts (the served path is ~25% faster with them,
# benchmarks/RESULTS.md).
SERVE_ENV = {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
             "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0", "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
             "RAY_SERVE_LOG_TO_STDERR": "0"}

SERVICER_FUNCTIONS = ["proto.moe_serve_pb2_grpc.add_MoeServeServicer_to_server",
                      "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"]


@dataclass(frozen=True)
class ServeOptions:
    engine: EngineConfig
    model_name: str = "moe-serve"
    engine_replicas: int = 1  # fixed count, unless max_replicas > min_replicas
    router_replicas: int = 1  # Ingress replicas
    min_replicas: int | None = None  # autoscaling bounds on engine replicas
    max_replicas: int | None = None
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 10.0
    look_back_period_s: float = 30.0  # ongoing requests averaged over this window, sampled 4 times in it
    max_ongoing_requests: int = 256  # per engine replica
    engine_cpus: float = 1.0  # Ray resources per engine replica
    engine_gpus: float = 0.0
    engine_resources: dict = field(default_factory=dict)  # custom Ray resources per engine replica
    # Ray resources of each attention / expert worker ("CPU", "GPU", custom ones to pin a pool to a node type)
    attention_worker_resources: dict = field(default_factory=lambda: {"CPU": 1.0})
    expert_worker_resources: dict = field(default_factory=lambda: {"CPU": 1.0})
    api_keys: tuple[str, ...] = ()
    # one replica is the engine and its front doors (EngineIngress), for one engine replica; else an Ingress
    # routes over the engine replicas
    engine_ingress: bool = False
    session_ttl_s: float = 1800.0
    routing_stats_period_s: float = 1.0

    @property
    def initial_replicas(self) -> int:
        """Engine replicas at start: the autoscaling floor, or the fixed count (min_replicas when min == max)."""
        return self.min_replicas or self.engine_replicas

    @property
    def autoscaling(self) -> dict | None:
        if self.max_replicas is None or self.max_replicas == (self.min_replicas or 1):
            return None
        # each Ingress replica reads its outputs from an engine replica over one stream while it has requests there
        # (EngineServer.outputs), which Serve counts as one more ongoing request: the target makes room for them
        target = self.target_ongoing_requests + self.router_replicas
        return {"min_replicas": self.min_replicas or 1, "max_replicas": self.max_replicas,
                "target_ongoing_requests": target, "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s, "look_back_period_s": self.look_back_period_s,
                "metrics_interval_s": min(10.0, self.look_back_period_s / 4)}


def build_serve_app(options: ServeOptions):
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from cluster.engine_server import EngineServer
    from cluster.ray_executor import WorkerPools
    from router.ingress import Ingress

    pools = WorkerPools(options.attention_worker_resources, options.expert_worker_resources)
    if options.engine_ingress:
        return engine_ingress_app(options, pools)
    autoscaling = options.autoscaling
    engine = serve.deployment(
        EngineServer, name="EngineServer",
        num_replicas=None if autoscaling else options.initial_replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.engine_cpus, "num_gpus": options.engine_gpus,
                           "resources": options.engine_resources},
        request_router_config=RequestRouterConfig(
            request_router_class="router.least_work_router:LeastWorkRouter",
            request_routing_stats_period_s=options.routing_stats_period_s),
        health_check_period_s=2.0,  # a replica whose engine could not be rebuilt is replaced soon
    ).bind(options.engine, pools)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=options.router_replicas,
                               max_ongoing_requests=4096, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engine, options.engine.model, options.model_name, options.api_keys, options.session_ttl_s)


def engine_ingress_app(options: ServeOptions, pools):
    """One EngineIngress replica: the engine and both doors in one process."""
    from ray import serve

    from cluster.engine_ingress import EngineIngress

    if options.initial_replicas != 1 or options.autoscaling or options.router_replicas != 1:
        raise ValueError("engine_ingress serves one engine replica with its own doors: give engine_replicas 1, "
                         "router_replicas 1 and no autoscaling (or route over several with an Ingress)")
    return serve.deployment(
        serve.ingress()(EngineIngress), name="EngineIngress", num_replicas=1, max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": options.engine_cpus, "num_gpus": options.engine_gpus,
                           "resources": options.engine_resources},
        health_check_period_s=2.0,
    ).bind(options.engine, pools, options.model_name, options.api_keys, options.session_ttl_s)


def grpc_options(port: int):
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS)


def app_builder(args: dict):
    """For `serve run cluster.serve_app:app_builder config=configs/x.yaml` (or a Serve config file's import_path,
    with `args: {config: ...}`), or `... key=value ...` of EngineConfig and ServeOptions fields."""
    if "config" in args:
        from cluster.serve_config import ServeConfig
        from cluster.tiny_checkpoint import default_checkpoint
        from workers.config import ModelConfig

        config = ServeConfig.load(args["config"])
        model = config.model.path or str(default_checkpoint())
        config.check(ModelConfig.from_pretrained(model))
        return build_serve_app(config.serve_options(model))
    engine_keys = {f.name for f in fields(EngineConfig)}
    engine = EngineConfig(**{k: coerce(EngineConfig, k, v) for k, v in args.items() if k in engine_keys})
    rest = {k: coerce(ServeOptions, k, v) for k, v in args.items() if k not in engine_keys}
    return build_serve_app(ServeOptions(engine=engine, **rest))


def coerce(cls, name: str, value):
    """A command-line string to the field's type."""
    if not isinstance(value, str):
        return value
    kind = {f.name: f.type for f in fields(cls)}[name]
    if "int" in str(kind) and "float" not in str(kind) and "tuple" not in str(kind):
        return int(value)
    if "float" in str(kind):
        return float(value)
    if "bool" in str(kind):
        return value.lower() in ("1", "true", "yes")
    if "tuple" in str(kind):
        return tuple(value.split(","))
    if "dict" in str(kind):  # CPU=1,GPU=1,my_node_type=1
        return {k: float(v) for k, v in (item.split("=") for item in value.split(","))}
    return value

