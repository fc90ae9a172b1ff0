"""config.json parsing: both rope layouts, and clear errors that name the field."""

import json

import pytest

from workers.config import ConfigError, ModelConfig

LITE_LEGACY = {
    "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 3, "num_attention_heads": 4, "max_position_embeddings": 4096, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
}


def test_legacy_and_transformers5_rope_layouts_agree():
    legacy = ModelConfig.from_dict(LITE_LEGACY)
    new = dict(LITE_LEGACY)
    scaling = dict(new.pop("rope_scaling"))
    new.pop("rope_theta")
    new["rope_parameters"] = {"rope_type": scaling.pop("type"), "rope_theta": 10000.0, **scaling}
    assert ModelConfig.from_dict(new).rope == legacy.rope
    assert legacy.rope.type == "yarn" and legacy.rope.factor == 40 and legacy.rope.mscale_all_dim == 0.707
    assert legacy.moe_layers == (1, 2)


def test_llama_linear_and_mqa(checkpoint_dir):
    cfg = ModelConfig.from_pretrained(checkpoint_dir("llama_mqa"))
    assert cfg.architecture == "llama" and cfg.num_key_value_heads == 1 and cfg.head_dim == 16
    assert cfg.rope.type == "linear" and cfg.rope.factor == 4.0 and cfg.rope.theta == 100000.0


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "architectures"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_parameters.type"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"kv_lora_rank": None}, "kv_lora_rank"),
    ({"n_group": 3}, "n_group"),
])
def test_unsupported_options_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict({**LITE_LEGACY, **change})


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="field '[a-z_]+' is required"):
        ModelConfig.from_pretrained(tmp_path)
