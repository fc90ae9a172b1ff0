"""A model instance across nodes: a Ray cluster of a head and two worker nodes on this machine, the attention pool
pinned to one node and the expert pool to the other by custom resources, served through the Serve app over HTTP.
The workers must land where their pool says, and the greedy tokens must equal the single-process engine's."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.ray_executor import NAMESPACE  # noqa: E402
from cluster.serve_app import ServeOptions, build_serve_app  # noqa: E402
from router.engine_config import EngineConfig  # noqa: E402
from router.llm_engine import LLMEngine  # noqa: E402
from workers.multiproc_executor import free_port  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

PROMPTS = ["def add(a, b):", "import numpy as np\n", "class Stack:\n    def push(self, x):", "# quicksort in C"]
NODE = {"num_cpus": 3, "object_store_memory": 100 * 2**20}  # a CPU to spare for the engine replica, wherever it lands


def test_attention_and_expert_pools_on_their_nodes_give_the_single_process_tokens(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    local_config = EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512)
    local = LLMEngine.from_config(local_config)
    tokenizer = local.tokenizer
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [out.outputs[0].token_ids for out in
            local.generate([tokenizer.encode(p) for p in PROMPTS], [params] * len(PROMPTS))]
    local.shutdown()

    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    attention_node = cluster.add_node(**NODE, resources={"attention_node": 2})
    expert_node = cluster.add_node(**NODE, resources={"expert_node": 2})
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig(**{**local_config.__dict__, "attention_workers": 2, "expert_workers": 2,
                                 "worker_threads": 1})
        options = ServeOptions(config, model_name="tiny", engine_cpus=1,
                               attention_worker_resources={"CPU": 1, "attention_node": 1},
                               expert_worker_resources={"CPU": 1, "expert_node": 1})
        serve.run(build_serve_app(options), name="moe-serve", route_prefix="/")

        def complete(prompt: str) -> httpx.Response:
            return httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                              json={"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                                    "return_token_ids": True})

        with ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched together, on both attention ranks
            replies = list(pool.map(complete, PROMPTS))
        assert [r.status_code for r in replies] == [200] * len(PROMPTS)
        assert [r.json()["choices"][0]["token_ids"] for r in replies] == want

        replica = replies[0].headers["x-moe-serve-replica"]
        workers = ["attention-0", "attention-1", "expert-0", "expert-1"]
        nodes = {w: ray.get(ray.get_actor(f"moe-serve/{replica}/{w}", namespace=NAMESPACE).node.remote())["node_id"]
                 for w in workers}
        assert nodes == {"attention-0": attention_node.node_id, "attention-1": attention_node.node_id,
                         "expert-0": expert_node.node_id, "expert-1": expert_node.node_id}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
