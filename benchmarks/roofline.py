"""The decode roofline of a DeepSeek-V2 model: the bytes one decode step must read, over the copy bandwidth.

A step of B sequences at context C reads every weight it uses once (attention, dense and shared MLPs, the router,
the lm_head; of the routed experts, those that at least one of the B tokens picks: E * (1 - (1 - k/E)^B) per MoE
layer when routing is uniform, as with random weights) plus each sequence's cached latents (C entries of
kv_lora_rank + qk_rope_head_dim per layer). The embedding table is read a row per token, so it is left out.
Tokens/s at the roofline is B over that many bytes' copy time.

Where the matmuls, not the memory, set the pace (a CPU at batch 64), `step_flops` counts the step's multiply-adds
the same way: each token through every weight it uses (its top-k experts), plus the absorbed attention's scores and
weighted sum over its context; `compute_tok_s` is B over their time at a measured matmul rate.
"""

from __future__ import annotations


def attention_params(c: dict) -> int:
    D, H = c["hidden_size"], c["num_attention_heads"]
    L, R, N, V = c["kv_lora_rank"], c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
    q = D * H * (N + R) if c.get("q_lora_rank") is None else D * c["q_lora_rank"] + c["q_lora_rank"] * H * (N + R)
    return q + D * (L + R) + L * H * (N + V) + H * V * D


def weight_params(c: dict, experts: float) -> float:
    """Parameters of the matrices but the embedding, with `experts` of the routed experts in each MoE layer."""
    D, layers, E = c["hidden_size"], c["num_hidden_layers"], c["n_routed_experts"]
    dense_layers = min(c["first_k_dense_replace"], layers) if E else layers
    moe_layer = 3 * D * c["moe_intermediate_size"] * (c["n_shared_experts"] + experts) + E * D
    return (layers * attention_params(c) + dense_layers * 3 * D * c["intermediate_size"]
            + (layers - dense_layers) * moe_layer + D * c["vocab_size"])


def step_bytes(c: dict, batch: int, context: int, dtype_bytes: int = 2) -> tuple[float, float]:
    """(weight bytes, cache bytes) one decode step of `batch` sequences at `context` tokens reads."""
    E, k = c["n_routed_experts"], c["num_experts_per_tok"]
    experts_read = E * (1 - (1 - k / E) ** batch) if E else 0.0
    cache = batch * context * c["num_hidden_layers"] * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
    return weight_params(c, experts_read) * dtype_bytes, cache * dtype_bytes


def roofline_tok_s(c: dict, batch: int, context: int, bandwidth: float, dtype_bytes: int = 2) -> float:
    """Decode tokens/s if a step took only its bytes' read time at `bandwidth` bytes/s."""
    weights, cache = step_bytes(c, batch, context, dtype_bytes)
    return batch * bandwidth / (weights + cache)


def step_flops(c: dict, batch: int, context: int) -> float:
    """FLOPs (2 per multiply-add) of one decode step of `batch` sequences at `context` tokens."""
    per_token = weight_params(c, c["num_experts_per_tok"] if c["n_routed_experts"] else 0)  # W_UK, W_UV absorbed alike
    attention = (c["num_hidden_layers"] * c["num_attention_heads"] * context
                 * (2 * c["kv_lora_rank"] + c["qk_rope_head_dim"]))  # scores over [c_kv | k_pe], then the sum of c_kv
    return 2.0 * batch * (per_token + attention)


def compute_tok_s(c: dict, batch: int, context: int, flops_per_s: float) -> float:
    """Decode tokens/s if a step took only its FLOPs' time at `flops_per_s`."""
    return batch * flops_per_s / step_flops(c, batch, context)
