"""The loader: sharded safetensors, partial loads that read only what they own, clear errors."""

import json
import shutil

import pytest
import torch

from workers.causal_lm import CausalLM
from workers.checkpoint import Checkpoint, CheckpointError
from workers.config import ModelConfig
from workers.expert_shard import ExpertShard
from workers.loader import build_model


def _reference_state(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()


def test_sharded_checkpoint_loads_every_weight(checkpoint_dir):
    d = checkpoint_dir("v2_236b")
    assert len(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    ckpt = Checkpoint(d)
    cfg = ModelConfig.from_pretrained(d)
    model = build_model(CausalLM, cfg, torch.device("cpu"), torch.float32, ckpt)
    assert sorted(ckpt.reads) == sorted(ckpt.names())  # everything, each once
    ref = _reference_state(d)
    layer = model.model.layers[2]
    torch.testing.assert_close(layer.self_attn.q_b_proj.weight, ref["model.layers.2.self_attn.q_b_proj.weight"])
    # transformers fuses experts as [E, 2I, D] gate|up, the same layout as ours
    torch.testing.assert_close(layer.mlp.experts.w13, ref["model.layers.2.mlp.experts.gate_up_proj"])
    torch.testing.assert_close(layer.mlp.experts.w2, ref["model.layers.2.mlp.experts.down_proj"])


def test_attention_side_reads_no_routed_expert(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    ckpt = Checkpoint(d)
    cfg = ModelConfig.from_pretrained(d)
    model = build_model(CausalLM, cfg, torch.device("cpu"), torch.float32, ckpt, expert_ids=[])
    assert ckpt.reads and not [n for n in ckpt.reads if ".mlp.experts." in n]
    assert {n for n in ckpt.names() if ".mlp.experts." not in n} == set(ckpt.reads)
    assert model.model.layers[1].mlp.experts.w13.shape[0] == 0


def test_expert_shard_reads_only_its_experts(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    ckpt = Checkpoint(d)
    cfg = ModelConfig.from_pretrained(d)
    shard = build_model(ExpertShard, cfg, torch.device("cpu"), torch.float32, ckpt, expert_ids=[5, 2])
    want = {f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
            for i in cfg.moe_layers for e in (5, 2) for p in ("gate", "up", "down")}
    assert set(ckpt.reads) == want
    ref = _reference_state(d)
    torch.testing.assert_close(shard.experts(2).w13[0], ref["model.layers.2.mlp.experts.gate_up_proj"][5])
    torch.testing.assert_close(shard.experts(1).w2[1], ref["model.layers.1.mlp.experts.down_proj"][2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(checkpoint_dir, dtype):
    d = checkpoint_dir("llama_mha")
    model = build_model(CausalLM, ModelConfig.from_pretrained(d), torch.device("cpu"), dtype, Checkpoint(d))
    assert {p.dtype for p in model.parameters()} == {dtype}
    ref = _reference_state(d)["model.layers.1.self_attn.k_proj.weight"]
    got = model.model.layers[1].self_attn.qkv_proj.weight[64:128]
    torch.testing.assert_close(got.float(), ref, rtol=1e-2, atol=1e-2)


def test_random_weights_read_nothing(checkpoint_dir):
    cfg = ModelConfig.from_pretrained(checkpoint_dir("v2_lite"))
    a = build_model(CausalLM, cfg, torch.device("cpu"), torch.float32, None, seed=3)
    b = build_model(CausalLM, cfg, torch.device("cpu"), torch.float32, None, seed=3)
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert a.model.norm.weight.eq(1).all() and a.lm_head.weight.std() > 0.01


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_names_the_file(checkpoint_dir, tmp_path):
    d = _copy(checkpoint_dir("llama_mha"), tmp_path / "ck")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(d)


def test_truncated_shard_names_the_file(checkpoint_dir, tmp_path):
    d = _copy(checkpoint_dir("llama_mha"), tmp_path / "ck")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=victim.name):
        Checkpoint(d)


def test_garbage_header_names_the_file(checkpoint_dir, tmp_path):
    d = _copy(checkpoint_dir("llama_mha"), tmp_path / "ck")
    victim = sorted(d.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{" + b"\x00" * 64)
    with pytest.raises(CheckpointError, match=f"{victim.name}: corrupt safetensors header"):
        Checkpoint(d)


def test_missing_tensor_is_named(checkpoint_dir, tmp_path):
    d = _copy(checkpoint_dir("llama_mha"), tmp_path / "ck")
    ckpt = Checkpoint(d)
    del ckpt.tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.gate_up_proj.weight up"):
        build_model(CausalLM, ModelConfig.from_pretrained(d), torch.device("cpu"), torch.float32, ckpt)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors"):
        Checkpoint(tmp_path)


def test_kv_b_rows_are_regrouped_per_half_with_unequal_head_dims(checkpoint_dir):
    """The checkpoint's kv_b_proj rows are per head [W_UK_h (N rows); W_UV_h (V rows)]; ours hold every W_UK, then
    every W_UV. With N != V a mix-up of the two cannot hide."""
    import dataclasses

    from workers.mla_attention import MLAAttention

    cfg = dataclasses.replace(ModelConfig.from_pretrained(checkpoint_dir("v2_lite")), qk_nope_head_dim=12,
                              v_head_dim=20)
    attn = MLAAttention(cfg, rotary=None)
    H, N, V, L = attn.num_heads, 12, 20, attn.latent_dim
    rows = torch.arange(H * (N + V) * L, dtype=torch.float32).view(H * (N + V), L)

    class Ref:
        def read_into(self, out):
            out.copy_(rows)

    attn.kv_b_proj.weight.weight_loader(attn.kv_b_proj.weight, Ref(), None)
    w_uk, w_uv = attn.kv_b_proj.halves()
    per_head = rows.view(H, N + V, L)
    torch.testing.assert_close(w_uk, per_head[:, :N])
    torch.testing.assert_close(w_uv, per_head[:, N:])
    assert w_uk.is_contiguous() and w_uv.is_contiguous()
