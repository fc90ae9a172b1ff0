"""Tiny random checkpoints made with transformers, saved sharded and rewritten to the published layout.

The tests build one of each supported shape; `moe-serve tiny-checkpoint DIR` makes one for the demo. Weights are
random (seeded), the tokenizer is byte-level with DeepSeek's special tokens and the DeepSeek-Coder-V2 chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"]
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}"
)

ROPE_YARN = {"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256, "beta_fast": 32,
             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

V2_LITE = dict(  # greedy routing, no q-LoRA, YaRN
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=8, num_experts_per_tok=3,
    first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, max_position_embeddings=8192, topk_method="greedy", routed_scaling_factor=1.0,
    bos_token_id=256, eos_token_id=257, rope_scaling=ROPE_YARN,
)
V2_236B = dict(  # q-LoRA, group-limited routing, routed scaling 16, several MoE layers after a dense one
    V2_LITE, q_lora_rank=48, num_hidden_layers=4, n_routed_experts=16, num_experts_per_tok=4,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0, n_shared_experts=1,
)
LLAMA_MHA = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=8192, rms_norm_eps=1e-6, bos_token_id=256, eos_token_id=257,
    rope_theta=100000.0, rope_scaling={"type": "linear", "factor": 4.0},
)
LLAMA_MQA = dict(LLAMA_MHA, num_key_value_heads=1)
SHAPES = {"v2_lite": ("deepseek_v2", V2_LITE), "v2_236b": ("deepseek_v2", V2_236B),
          "llama_mha": ("llama", LLAMA_MHA), "llama_mqa": ("llama", LLAMA_MQA)}


def save_tokenizer(out: Path) -> None:
    """A byte-level tokenizer (every byte a token, then DeepSeek's special tokens) with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[1], add_bos_token=True)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def _hf_rope(kw: dict) -> dict:
    """Our published-layout kwargs -> transformers 5 `rope_parameters`."""
    kw = dict(kw)
    scaling = dict(kw.pop("rope_scaling"))
    rope = {"rope_type": scaling.pop("type"), "rope_theta": kw.pop("rope_theta", 10000.0), **scaling}
    kw["rope_parameters"] = rope
    return kw


def make_checkpoint(kind: str, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Saves a random transformers model of `kind` to `out` in the published layout; returns out. overrides
    replace config fields (e.g. max_position_embeddings and rope_scaling for a 128K-token miniature)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, LlamaConfig, LlamaForCausalLM

    arch, kw = SHAPES[kind]
    kw = {**kw, **overrides}
    torch.manual_seed(seed)
    if arch == "deepseek_v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**_hf_rope(kw)))
    else:
        model = LlamaForCausalLM(LlamaConfig(**_hf_rope(kw)))
    model.to(dtype).save_pretrained(str(out), max_shard_size="200KB")
    rewrite_published(out / "config.json", kw)
    save_tokenizer(out)
    return out


def rewrite_published(path: Path, kw: dict) -> None:
    """transformers 5 writes `rope_parameters`; the published checkpoints have `rope_scaling` with `type`."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope.pop("rope_type")
    cfg["rope_scaling"] = None if "rope_scaling" not in kw else dict(kw["rope_scaling"])
    if cfg.get("model_type") == "deepseek_v2":
        for derived in ("head_dim", "qk_head_dim"):
            cfg.pop(derived, None)
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2))


LONG_CONTEXT = dict(max_position_embeddings=163840, rope_scaling={  # DeepSeek-V2's: YaRN x40 over 4K positions
    "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
    "mscale": 0.707, "mscale_all_dim": 0.707})


def default_checkpoint() -> Path:
    """The embedded default model: the tiny V2-Lite shape with DeepSeek-V2's 160K-token context, made once
    (seeded, offline) under the user's cache directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moe-serve"
    out = cache / "tiny-deepseek-v2"
    if not (out / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache))
        make_checkpoint("v2_lite", tmp / "model", **LONG_CONTEXT)
        try:
            (tmp / "model").rename(out)
        except OSError:  # made meanwhile by another process
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    return out
