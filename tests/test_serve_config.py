"""YAML configs: every file in configs/ loads, and each GPU config fits its GPUs by the memory plan from the
published shapes; an impossible one is refused with the plan; bad files are errors naming the file and the field;
`moe-serve up` flags override only the fields given."""

import re
from pathlib import Path

import pytest

from cluster.cli import build_parser, main, overrides
from cluster.memory_plan import MemoryPlan
from cluster.serve_config import ServeConfig, ServeConfigError
from router.engine_config import EngineConfig
from workers.config import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SHAPES = ROOT / "benchmarks" / "shapes"
GPU_CONFIGS = {"deepseek-coder-v2-lite-1gpu.yaml", "deepseek-coder-v2-lite-4gpu.yaml",
               "deepseek-v2-236b-2x8gpu.yaml", "deepseek-coder-6.7b-1gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_validates_and_gpu_configs_fit(path):
    config = ServeConfig.load(str(path))
    options = config.serve_options(config.model.path or "/tmp/tiny")
    assert options.engine.attention_workers == config.topology.attention_workers
    if config.autoscaling is None:
        assert options.autoscaling is None
    else:  # Serve's autoscaling config carries the file's bounds and delays, its target with room for each Ingress
        # replica's output stream (one more ongoing request on an engine replica)
        want = config.autoscaling.model_dump()
        want["target_ongoing_requests"] += options.router_replicas
        assert want.items() <= options.autoscaling.items()
    assert config.uses_gpus == (path.name in GPU_CONFIGS)
    if config.uses_gpus:
        plan = config.check(config.model_shapes())
        assert plan.fits and len(plan.workers) == config.topology.attention_workers + config.topology.expert_workers
        assert all(w.cache_tokens is None or w.cache_tokens >= plan.max_model_len for w in plan.workers)


def test_tiny_cpu_yaml_is_the_default():
    assert ServeConfig.load(str(ROOT / "configs/tiny-cpu.yaml")).serve_options("m") == \
        ServeConfig.load(None).serve_options("m")


@pytest.mark.parametrize("shapes, billions, kv_bytes", [
    ("deepseek-v2-236b", 236, 60 * (512 + 64) * 2),
    ("deepseek-coder-v2-lite", 15.7, 27 * (512 + 64) * 2),
    ("deepseek-coder-6.7b", 6.7, 32 * 2 * 4096 * 2),
])
def test_memory_plan_counts_the_published_sizes(shapes, billions, kv_bytes):
    model = ModelConfig.from_pretrained(SHAPES / shapes)
    whole = MemoryPlan.build(EngineConfig(dtype="bfloat16"), model, 10**15)
    assert whole.workers[0].weight_bytes / 2 / 1e9 == pytest.approx(billions, rel=0.01)
    assert whole.kv_bytes_per_token == kv_bytes
    if model.n_routed_experts:  # split: attention side + every expert worker's share = the whole model
        split = MemoryPlan.build(EngineConfig(dtype="bfloat16", attention_workers=2, expert_workers=3), model, 10**15)
        attention, *experts = [w.weight_bytes for w in split.workers[1:]]
        assert split.workers[0].weight_bytes == attention and attention + sum(experts) == whole.workers[0].weight_bytes
        assert split.workers[0].cache_tokens > whole.workers[0].cache_tokens


@pytest.mark.parametrize("yaml_text, message", [
    (f"model: {{shapes: {SHAPES / 'deepseek-v2-236b'}}}\nresources: {{engine: {{gpus: 1}}}}\n",
     r"the model does not fit:.*engine replica: 471\.5 GB of weights do not fit on one 80 GB GPU.*expert workers"),
    (f"model: {{shapes: {SHAPES / 'deepseek-coder-6.7b'}}}\nresources: {{gpu_memory_gb: 16, engine: {{gpus: 1}}}}\n",
     r"the model does not fit:.*engine replica: its KV cache holds \d+ tokens, less than one 16384-token sequence"),
])
def test_an_impossible_plan_is_refused_with_the_plan(tmp_path, yaml_text, message):
    path = tmp_path / "big.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ServeConfigError, match="(?s)" + re.escape(f"{path}: ") + message) as e:
        ServeConfig.load(str(path))
    assert "memory plan (" in str(e.value)


@pytest.mark.parametrize("yaml_text, field, message", [
    ("topology:\n  expert_worker: 2\n", "topology.expert_worker", "unknown field; did you mean 'expert_workers'"),
    ("sheduler: {}\n", "sheduler", "unknown field; did you mean 'scheduler'"),
    ("scheduler:\n  max_num_seqs: lots\n", "scheduler.max_num_seqs", "valid integer"),
    ("scheduler:\n  stream_interval: 0\n", "scheduler.stream_interval", "greater than or equal to 1"),
    ("resources:\n  engine: {gpus: one}\n", "resources.engine.gpus", "valid number"),
    ("model: {dtype: fp8}\n", "model.dtype", "'auto', 'float32', 'bfloat16' or 'float16'"),
    (f"model: {{shapes: {SHAPES / 'deepseek-coder-6.7b'}}}\ntopology: {{expert_workers: 2}}\n",
     "topology.expert_workers", "the model is dense"),
    (f"model: {{shapes: {SHAPES / 'deepseek-coder-v2-lite'}}}\ntopology: {{expert_workers: 65}}\n",
     "topology.expert_workers", "65 expert workers for 64 routed experts"),
    ("topology: {expert_placement: [0, 1]}\n", "topology.expert_placement", "needs topology.expert_workers"),
    ("autoscaling: {min_replicas: 3, max_replicas: 2}\n", "autoscaling.max_replicas", "below min_replicas"),
    ("autoscaling: {max_replicas: 2}\nreplicas: {engine: 2}\n", "replicas.engine", "not both"),
    ("autoscaling: {min_replicas: 2}\n", "autoscaling.max_replicas", "required"),
    ("model: {shapes: nowhere}\n", "model.shapes", "no config.json in"),
    ("server: {ingress: haproxy}\n", "server.ingress", "'proxy', 'direct' or 'engine'"),
    ("server: {ingress: direct, http_port: 0}\n", "server.http_port", "direct ingress needs 1 port(s) from it"),
    ("server: {ingress: direct, http_port: 8000, grpc_port: 8001}\nreplicas: {router: 2}\n", "server.grpc_port",
     "they overlap"),
    ("server: {ingress: engine}\nreplicas: {engine: 2}\n", "replicas.engine", "serves one engine replica"),
    ("server: {ingress: engine}\nreplicas: {router: 2}\n", "replicas.router", "serves one engine replica"),
    ("server: {ingress: engine}\nautoscaling: {max_replicas: 2}\n", "autoscaling", "autoscaling needs ingress"),
    ("server: {ingress: engine, http_port: 0}\n", "server.http_port", "direct ingress needs 1 port(s) from it"),
])
def test_bad_config_names_file_and_field(tmp_path, yaml_text, field, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ServeConfigError, match=re.escape(f"{path}: {field}: ") + ".*" + re.escape(message)):
        ServeConfig.load(str(path))


@pytest.mark.parametrize("yaml_text, message", [
    ("model: [\n", r":2: not valid YAML"),
    ("- 1\n", r": expected sections .* not a list"),
])
def test_not_a_config(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ServeConfigError, match=re.escape(str(path)) + message):
        ServeConfig.load(str(path))


def test_up_flags_given_override_the_file_and_only_those():
    path = str(ROOT / "configs/deepseek-coder-v2-lite-4gpu.yaml")
    args = build_parser().parse_args(["up", path, "--expert-workers", "4", "--max-num-seqs", "8",
                                      "--no-prefix-caching", "--api-key", "k1", "--api-key", "k2",
                                      "--stream-interval", "4", "--enforce-eager"])
    options = ServeConfig.load(args.config, overrides(args)).serve_options("/models/x")
    e = options.engine
    assert e.enforce_eager
    assert (e.expert_workers, e.max_num_seqs, e.enable_prefix_caching, options.api_keys) == (4, 8, False, ("k1", "k2"))
    assert e.stream_interval == 4
    assert (e.attention_workers, e.max_num_batched_tokens, e.dtype) == (2, 8192, "bfloat16")  # from the file
    assert options.attention_worker_resources == {"CPU": 4.0, "GPU": 1.0}
    assert overrides(build_parser().parse_args(["up", path])) == {}


def test_up_reports_a_bad_config_before_starting_anything(capsys):
    path = str(ROOT / "configs/deepseek-coder-6.7b-1gpu.yaml")
    assert main(["up", path, "--expert-workers", "2"]) == 2
    assert f"{path}: topology.expert_workers: the model is dense" in capsys.readouterr().err


def test_direct_ingress_needs_the_ray_that_up_starts(capsys):
    assert main(["up", "--ingress", "direct", "--address", "auto"]) == 2
    assert "server.ingress: direct is set up in the Ray that `moe-serve up` starts" in capsys.readouterr().err


def test_dashboard_is_left_out_only_of_the_ray_that_up_starts(capsys):
    assert ServeConfig.load(None, {}).server.ray_dashboard  # on unless asked
    assert overrides(build_parser().parse_args(["up", "--no-ray-dashboard"])) == {"server.ray_dashboard": False}
    assert main(["up", "--no-ray-dashboard", "--address", "auto"]) == 2
    assert "server.ray_dashboard: the dashboard is left out of the Ray that `moe-serve up` starts" in (
        capsys.readouterr().err)


def test_serve_import_path_takes_a_config(tmp_path, checkpoint_dir):
    from ray.serve import Application

    from cluster.serve_app import app_builder

    good = tmp_path / "good.yaml"
    good.write_text(f"model: {{path: {checkpoint_dir('v2_lite')}}}\ntopology: {{expert_workers: 2}}\n")
    assert isinstance(app_builder({"config": str(good)}), Application)
    bad = tmp_path / "bad.yaml"
    bad.write_text("topology: {expert_worker: 2}\n")
    with pytest.raises(ServeConfigError, match="topology.expert_worker"):
        app_builder({"config": str(bad)})
