"""ServeConfig: a deployment described in YAML (configs/*.yaml), validated at the edge and turned into the frozen
EngineConfig and ServeOptions.

Every field has a default, so an empty file (or none: `moe-serve up`) serves the built-in tiny model. Unknown
fields and wrong types are errors that name the file and the field. Relative paths are relative to the file.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from cluster.memory_plan import MemoryPlan
from cluster.serve_app import ServeOptions
from router.engine_config import EngineConfig
from workers.config import ModelConfig
from workers.multiproc_executor import placement_for


class ServeConfigError(ValueError):
    """A config we cannot serve; the message names the file and the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSection(Section):
    path: str | None = None  # HF checkpoint directory; none: the built-in tiny DeepSeek-V2
    shapes: str | None = None  # a directory with the model's config.json, for checks while `path` is elsewhere
    name: str | None = None  # the model's name in the API (default: the directory's name)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    random_weights: bool = False
    enforce_eager: bool = EngineConfig.enforce_eager  # GPU: no CUDA graphs for decode

    @field_validator("path", "shapes")
    @classmethod
    def relative_to_file(cls, value: str | None, info) -> str | None:
        base = (info.context or {}).get("base")
        if value is None or base is None:
            return value
        return str(Path(base, Path(value).expanduser()))


class Topology(Section):
    attention_workers: int = Field(EngineConfig.attention_workers, ge=1)
    expert_workers: int = Field(EngineConfig.expert_workers, ge=0)
    expert_placement: list[int] | None = None  # expert worker of each routed expert; default: contiguous ranges
    micro_batches: int = Field(EngineConfig.micro_batches, ge=1)


class WorkerResources(Section):
    cpus: float = Field(1.0, ge=0)
    gpus: float = Field(0.0, ge=0)
    custom: dict[str, float] = {}  # custom Ray resources, e.g. {node_type_h100: 1}, to pin workers to nodes

    def ray_resources(self) -> dict:
        return {k: v for k, v in {"CPU": self.cpus, "GPU": self.gpus, **self.custom}.items() if v}


class Resources(Section):
    gpu_memory_gb: float = Field(80.0, gt=0)  # of each GPU, for the memory plan
    engine: WorkerResources = WorkerResources()  # each engine replica (it holds the model when colocated)
    attention_worker: WorkerResources = WorkerResources()
    expert_worker: WorkerResources = WorkerResources()
    malloc: Literal["tcmalloc", "system"] = "tcmalloc"  # the allocator of the Ray workers `moe-serve up` starts


class Cache(Section):
    kv_cache_gib: float = Field(EngineConfig.kv_cache_gib, gt=0)  # on CPU
    gpu_memory_utilization: float = Field(EngineConfig.gpu_memory_utilization, gt=0, le=1)
    prefix_caching: bool = EngineConfig.enable_prefix_caching


class Scheduler(Section):
    max_num_seqs: int = Field(EngineConfig.max_num_seqs, ge=1)
    max_num_batched_tokens: int = Field(EngineConfig.max_num_batched_tokens, ge=1)
    max_model_len: int | None = Field(EngineConfig.max_model_len, ge=1)  # default: the model's
    max_waiting: int = Field(EngineConfig.max_waiting, ge=0)
    stream_interval: int = Field(EngineConfig.stream_interval, ge=1)


class Replicas(Section):
    router: int = Field(ServeOptions.router_replicas, ge=1)
    engine: int = Field(ServeOptions.engine_replicas, ge=1)  # a fixed count; or give `autoscaling`


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(ge=1)
    target_ongoing_requests: float = Field(ServeOptions.target_ongoing_requests, gt=0)
    upscale_delay_s: float = Field(ServeOptions.upscale_delay_s, ge=0)
    downscale_delay_s: float = Field(ServeOptions.downscale_delay_s, ge=0)
    look_back_period_s: float = Field(ServeOptions.look_back_period_s, gt=0)


class Server(Section):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(9000, ge=0, le=65535)
    api_keys: list[str] = []  # require 'Authorization: Bearer KEY'
    # proxy: Serve's proxy listens on the ports and hands each request to an Ingress replica; direct: the Ingress
    # replicas listen on them themselves, one hop less (cluster/direct_ingress.py; a Ray `moe-serve up` starts);
    # engine: as direct, with the one engine replica its own Ingress (cluster/engine_ingress.py)
    ingress: Literal["proxy", "direct", "engine"] = "proxy"
    # the Ray dashboard in the Ray `moe-serve up` starts; off, Ray's API server runs without the dashboard's ten
    # module processes, whose wake-ups then leave the model's cores (~8% more tokens/s at concurrency 64 on 2 cores),
    # and the dashboard's pages and its job, state and Serve APIs are gone (`moe-serve status` does not need them)
    ray_dashboard: bool = True


class ServeConfig(Section):
    model: ModelSection = ModelSection()
    topology: Topology = Topology()
    resources: Resources = Resources()
    cache: Cache = Cache()
    scheduler: Scheduler = Scheduler()
    replicas: Replicas = Replicas()
    autoscaling: Autoscaling | None = None
    server: Server = Server()
    _source: str = PrivateAttr("command line")

    @classmethod
    def load(cls, path: str | None = None, overrides: dict | None = None) -> "ServeConfig":
        """The YAML file at path (none: every default), with overrides {"section.field": value} from the command
        line; checked against the model's config.json when it is on this machine."""
        source = path or "command line"
        raw = {} if path is None else read_yaml(path)
        for dotted, value in (overrides or {}).items():
            *parents, name = dotted.split(".")
            node = raw
            for p in parents:
                if node.get(p) is None:  # absent, or an empty section
                    node[p] = {}
                node = node[p]
            node[name] = value
        try:
            config = cls.model_validate(raw, context={"base": None if path is None else Path(path).parent})
        except ValidationError as e:
            raise ServeConfigError("\n".join(describe(source, err, overrides or {}) for err in e.errors())) from None
        config._source = source
        config.check_fields()
        model = config.model_shapes()
        if model is not None:
            config.check(model)
        return config

    def error(self, field: str, message: str) -> ServeConfigError:
        return ServeConfigError(f"{self._source}: {field}: {message}")

    def check_fields(self) -> None:
        t, a = self.topology, self.autoscaling
        if t.expert_placement is not None and not t.expert_workers:
            raise self.error("topology.expert_placement", "an expert placement needs topology.expert_workers")
        if a is not None and a.max_replicas < a.min_replicas:
            raise self.error("autoscaling.max_replicas", f"{a.max_replicas} is below min_replicas {a.min_replicas}")
        if a is not None and "engine" in self.replicas.model_fields_set:
            raise self.error("replicas.engine", "give a fixed count or autoscaling bounds, not both")
        if self.model.shapes is not None and not Path(self.model.shapes, "config.json").is_file():
            raise self.error("model.shapes", f"no config.json in {self.model.shapes}")
        if self.server.ingress == "engine":
            self.check_engine_ingress()
        if self.server.ingress in ("direct", "engine"):
            self.check_direct_ports()

    def check_engine_ingress(self) -> None:
        """The engine replica serves the doors itself: there is one, and no separate Ingress."""
        if self.autoscaling is not None:
            raise self.error("autoscaling", "ingress engine serves one engine replica; autoscaling needs ingress "
                             "proxy or direct (an Ingress routing over the replicas)")
        for name in ("engine", "router"):
            if getattr(self.replicas, name) != 1:
                raise self.error(f"replicas.{name}", "ingress engine serves one engine replica with its own doors; "
                                 "give 1, or use ingress proxy or direct for several")

    def check_direct_ports(self) -> None:
        """Direct ingress: each node's Ingress replicas take the ports from http_port and from grpc_port, one each."""
        s, n = self.server, self.replicas.router
        for name in ("http_port", "grpc_port"):
            if not 0 < getattr(s, name) <= 65536 - n:
                raise self.error(f"server.{name}", f"direct ingress needs {n} port(s) from it; give a port "
                                 f"from 1 to {65536 - n}")
        if abs(s.http_port - s.grpc_port) < n:
            raise self.error("server.grpc_port", f"direct ingress takes {n} port(s) from http_port {s.http_port} and "
                             f"from grpc_port {s.grpc_port}; they overlap: move one")

    def model_shapes(self) -> ModelConfig | None:
        """The model's shapes: the checkpoint's config.json, else `shapes`; None when neither is here."""
        for d in (self.model.path, self.model.shapes):
            if d is not None and Path(d, "config.json").is_file():
                return ModelConfig.from_pretrained(d)
        return None

    def check(self, model: ModelConfig) -> MemoryPlan | None:
        """The topology against the model, and the memory plan when the model runs on GPUs; returns the plan."""
        engine = self.engine_config("")
        if engine.expert_workers and not model.n_routed_experts:
            raise self.error("topology.expert_workers", "the model is dense (it has no routed experts); give 0")
        try:
            placement_for(engine, model)
        except ValueError as e:
            field = "expert_placement" if self.topology.expert_placement is not None else "expert_workers"
            raise self.error(f"topology.{field}", str(e)) from None
        if not self.uses_gpus:
            return None
        plan = MemoryPlan.build(engine, model, int(self.resources.gpu_memory_gb * 1e9))
        if not plan.fits:
            raise ServeConfigError(f"{self._source}: the model does not fit:\n{plan.describe()}")
        return plan

    @property
    def uses_gpus(self) -> bool:
        """Whether the processes holding the model ask for GPUs: the engine replica, or its workers."""
        r = self.resources
        if not self.engine_config("").multiprocess:
            gpus = r.engine.gpus
        else:
            gpus = max(r.attention_worker.gpus, r.expert_worker.gpus if self.topology.expert_workers else 0.0)
        return self.model.device != "cpu" and gpus > 0

    def engine_config(self, model_dir: str) -> EngineConfig:
        m, t, c, s = self.model, self.topology, self.cache, self.scheduler
        return EngineConfig(
            model=model_dir, dtype=m.dtype, device=m.device, random_weights=m.random_weights,
            enforce_eager=m.enforce_eager, max_num_seqs=s.max_num_seqs, max_num_batched_tokens=s.max_num_batched_tokens,
            max_model_len=s.max_model_len, max_waiting=s.max_waiting, stream_interval=s.stream_interval,
            kv_cache_gib=c.kv_cache_gib,
            gpu_memory_utilization=c.gpu_memory_utilization, enable_prefix_caching=c.prefix_caching,
            attention_workers=t.attention_workers, expert_workers=t.expert_workers,
            expert_placement=None if t.expert_placement is None else tuple(t.expert_placement),
            micro_batches=t.micro_batches)

    def serve_options(self, model_dir: str) -> ServeOptions:
        r = self.resources
        scaling = {} if self.autoscaling is None else self.autoscaling.model_dump()  # ServeOptions' own names
        return ServeOptions(
            self.engine_config(model_dir), model_name=self.model.name or Path(model_dir).name,
            engine_replicas=self.replicas.engine, router_replicas=self.replicas.router, **scaling,
            engine_cpus=r.engine.cpus, engine_gpus=r.engine.gpus, engine_resources=dict(r.engine.custom),
            attention_worker_resources=r.attention_worker.ray_resources(),
            expert_worker_resources=r.expert_worker.ray_resources(),
            api_keys=tuple(self.server.api_keys), engine_ingress=self.server.ingress == "engine")


def read_yaml(path: str) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ServeConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ServeConfigError(f"{path}: not valid YAML (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ServeConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ServeConfigError(f"{path}: expected sections (model:, topology:, ...), not a {type(raw).__name__}")
    return raw


def describe(source: str, err: dict, overrides: dict) -> str:
    """One pydantic error as `file: section.field: what is wrong`."""
    field = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        known = sibling_fields(err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        message = "unknown field" + (f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(known)}")
    elif err["type"] == "missing":
        message = "required"
    else:
        message = f"{err['msg']} (got {err['input']!r})"
    return f"{source}: {field}: {message}" + (" (from the command line)" if field in overrides else "")


def sibling_fields(loc: tuple) -> list[str]:
    """The field names next to loc's last part."""
    cls = ServeConfig
    for part in loc[:-1]:
        annotation = cls.model_fields[part].annotation
        cls = next(t for t in (annotation, *get_args(annotation)) if isinstance(t, type) and issubclass(t, Section))
    return list(cls.model_fields)
