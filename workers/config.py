"""ModelConfig: the one description of a checkpoint's architecture, read from its config.json.

Both shapes of the rope settings are accepted:
- legacy: ``rope_scaling: {type: yarn|linear, ...}`` beside a top-level ``rope_theta``;
- transformers 5: ``rope_parameters: {rope_type: ..., rope_theta: ..., ...}``.
Anything we do not implement is refused with an error that names the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHITECTURES = {"DeepseekV2ForCausalLM": "deepseek_v2", "LlamaForCausalLM": "llama"}
MODEL_TYPES = {"deepseek_v2": "deepseek_v2", "llama": "llama"}
ROPE_TYPES = ("default", "linear", "yarn")
TOPK_METHODS = ("greedy", "group_limited_greedy")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT_FIELDS = {  # config.json integer fields we read, each with its least valid value (checked when not null)
    "vocab_size": 1, "hidden_size": 1, "intermediate_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
    "num_key_value_heads": 1, "max_position_embeddings": 1, "head_dim": 1, "q_lora_rank": 1, "kv_lora_rank": 1,
    "qk_nope_head_dim": 1, "qk_rope_head_dim": 1, "v_head_dim": 1, "n_routed_experts": 0, "n_shared_experts": 0,
    "num_experts_per_tok": 0, "moe_intermediate_size": 0, "first_k_dense_replace": 0, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "bos_token_id": 0, "original_max_position_embeddings": 1,
}
FLOAT_FIELDS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")  # non-negative numbers
ROPE_FLOAT_FIELDS = ("rope_theta", "factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                     "attention_factor")


class ConfigError(ValueError):
    """A checkpoint config we cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    type: str = "default"  # default | linear | yarn
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # "deepseek_v2" | "llama"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "float32"
    # Llama
    head_dim: int = 0
    # DeepSeek-V2 MLA
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # DeepSeekMoE
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_mla(self) -> bool:
        return self.architecture == "deepseek_v2"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        """DeepSeek's rule: routed experts from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ConfigError(f"{model_dir}: no such model directory (no config.json to read)")
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        _check_types(raw, source)

        def need(key):
            if raw.get(key) is None:
                raise ConfigError(f"{source}: field '{key}' is required")
            return raw[key]

        arch = _architecture(raw, source)
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: field 'hidden_act' = {raw['hidden_act']!r} is not supported (only 'silu')")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        heads = need("num_attention_heads")
        common = dict(
            architecture=arch,
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            intermediate_size=need("intermediate_size"),
            num_hidden_layers=need("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            max_position_embeddings=need("max_position_embeddings"),
            rope=_rope(raw, source),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype if dtype in DTYPES else "float32",
            raw=raw,
        )
        if arch == "llama":
            head_dim = raw.get("head_dim") or need("hidden_size") // heads
            if heads % common["num_key_value_heads"]:
                raise ConfigError(f"{source}: 'num_attention_heads' must be a multiple of 'num_key_value_heads'")
            return cls(head_dim=head_dim, **common)
        return cls(**common, **_deepseek_fields(raw, source, need))


def _check_types(raw: dict, source: str) -> None:
    """Each field we read has the JSON type we use it as, so a typo is an error naming the field here rather than a
    TypeError deep in model construction."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object of fields, not a {type(raw).__name__}")
    for key, least in INT_FIELDS.items():
        _check_int(raw, key, least, source)
    for key in FLOAT_FIELDS:
        _check_number(raw, key, source)
    eos = raw.get("eos_token_id")
    if not (eos is None or _is_int(eos) or isinstance(eos, list) and all(_is_int(t) for t in eos)):
        raise ConfigError(f"{source}: field 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
    archs = raw.get("architectures")
    if not (archs is None or isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"{source}: field 'architectures' must be a list of class names, got {archs!r}")
    for key in ("rope_scaling", "rope_parameters"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: field '{key}' must be an object or null, got {value!r}")
        for sub in ROPE_FLOAT_FIELDS:
            _check_number(value or {}, sub, source, f"{key}.")
        _check_int(value or {}, "original_max_position_embeddings", 1, source, f"{key}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(raw: dict, key: str, least: int, source: str, prefix: str = "") -> None:
    value = raw.get(key)
    if value is not None and not (_is_int(value) and value >= least):
        raise ConfigError(f"{source}: field '{prefix}{key}' must be an integer >= {least}, got {value!r}")


def _check_number(raw: dict, key: str, source: str, prefix: str = "") -> None:
    value = raw.get(key)
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
        raise ConfigError(f"{source}: field '{prefix}{key}' must be a number >= 0, got {value!r}")


def _architecture(raw: dict, source: str) -> str:
    for name in raw.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if raw.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[raw["model_type"]]
    found = raw.get("architectures") or raw.get("model_type")
    raise ConfigError(
        f"{source}: field 'architectures' = {found!r} is not supported; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def _rope(raw: dict, source: str) -> RopeConfig:
    if raw.get("rope_parameters") is not None:
        params, where = dict(raw["rope_parameters"]), "rope_parameters"
    else:
        params, where = dict(raw.get("rope_scaling") or {}), "rope_scaling"
    if "rope_theta" not in params:
        params["rope_theta"] = raw.get("rope_theta", 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: field '{where}.type' = {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    factor = float(params.get("factor") or 1.0)
    if rope_type != "default" and factor < 1.0:
        raise ConfigError(f"{source}: field '{where}.factor' must be >= 1, got {factor}")
    omax = params.get("original_max_position_embeddings") or raw.get("original_max_position_embeddings")
    if rope_type == "yarn" and omax is None:
        omax = raw.get("max_position_embeddings")
    return RopeConfig(
        type=rope_type,
        theta=float(params["rope_theta"]),
        factor=factor,
        original_max_position_embeddings=omax,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
    )


def _deepseek_fields(raw: dict, source: str, need) -> dict:
    scoring = raw.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ConfigError(f"{source}: field 'scoring_func' = {scoring!r} is not supported (only 'softmax')")
    method = raw.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise ConfigError(
            f"{source}: field 'topk_method' = {method!r} is not supported; supported: {', '.join(TOPK_METHODS)}"
        )
    experts = raw.get("n_routed_experts") or 0
    out = dict(
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=need("kv_lora_rank"),
        qk_nope_head_dim=need("qk_nope_head_dim"),
        qk_rope_head_dim=need("qk_rope_head_dim"),
        v_head_dim=need("v_head_dim"),
        n_routed_experts=experts,
        n_shared_experts=raw.get("n_shared_experts") or 0,
        num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
        moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        moe_layer_freq=raw.get("moe_layer_freq") or 1,
        topk_method=method,
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
    )
    if experts:
        if not out["num_experts_per_tok"] or not out["moe_intermediate_size"]:
            raise ConfigError(f"{source}: 'num_experts_per_tok' and 'moe_intermediate_size' are required with experts")
        if experts % out["n_group"]:
            raise ConfigError(f"{source}: field 'n_group' = {out['n_group']} must divide 'n_routed_experts' = {experts}")
        if method == "group_limited_greedy" and out["topk_group"] > out["n_group"]:
            raise ConfigError(f"{source}: field 'topk_group' must be <= 'n_group'")
    return out


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """float32 on CPU and bfloat16 on GPU unless told otherwise."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--dtype {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]
