"""Builds a model (whole, attention side, or a set of experts) and fills it from a checkpoint or at random.

Generic: the model names the parameter for each checkpoint tensor (`weight_target`); each parameter knows how to
take its slice (`weight_loader`). Parameters are allocated once in the target dtype and device; tensors are read
one at a time, so peak extra memory is about one tensor. `check_checkpoint` runs the same matching against the
model built on the meta device, reading no weight: every error a load would meet, in seconds, before any process
starts.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from workers.causal_lm import CausalLM
from workers.checkpoint import Checkpoint, CheckpointError, TensorRef
from workers.config import ModelConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_weight_loader(param: torch.Tensor, ref, shard) -> None:
    ref.read_into(param.data)


class ShapeOnly:
    """Stands in for a TensorRef when checking a checkpoint: the loaders' shape checks run, no byte is read."""

    def __init__(self, ref: TensorRef):
        self.ref = ref

    def __getattr__(self, name):
        return getattr(self.ref, name)

    def read_into(self, out: torch.Tensor) -> None:
        self.ref.check_fits(out)


def load_weights(model: nn.Module, checkpoint: Checkpoint, read: bool = True) -> None:
    """Reads exactly the tensors `model` holds; errors name the file and the missing or mismatched tensor.
    read=False: match names and shapes only (for a model on the meta device)."""
    params = dict(model.named_parameters())
    loaded: set[tuple[str, object]] = set()
    for name in checkpoint.names():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        target, shard = model.weight_target(name)
        param = params.get(target)
        if param is None:
            continue  # another rank's tensor (or one we do not use): not read
        loader = getattr(param, "weight_loader", default_weight_loader)
        ref = checkpoint[name]
        try:
            loader(param, ref if read else ShapeOnly(ref), shard)
        except CheckpointError:
            raise  # names the file and tensor already
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ref.path}: cannot load tensor '{name}' into '{target}' ({e})") from None
        loaded.add((target, shard))
    missing = [
        f"{pname}{'' if s is None else f' {s}'}"
        for pname, p in params.items()
        for s in getattr(p, "shards", (None,))
        if (pname, s) not in loaded
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{checkpoint.dir}: checkpoint lacks weights for {shown}")


@torch.no_grad()
def init_random(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the right shapes (`--random-weights`): norms at 1, everything else N(0, std).

    Each tensor (each expert's slice, for stacked experts) draws from its own generator seeded by its name, so a
    model split across workers gets the same weights as the whole model built in one process."""
    device = next(model.parameters()).device

    def normal_(t: torch.Tensor, key: str) -> None:
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        t.normal_(0.0, std, generator=gen)

    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        elif hasattr(p, "expert_ids"):  # [E_local, ...] stacked experts
            for i, e in enumerate(p.expert_ids):
                normal_(p[i], f"{name}.{e}")
        else:
            normal_(p, name)


def build_model(cls, config, device: torch.device, dtype: torch.dtype, checkpoint: Checkpoint | None = None,
                seed: int = 0, **kwargs) -> nn.Module:
    """Allocates `cls(config, **kwargs)` uninitialized on `device` in `dtype`, then loads or randomizes it."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, **kwargs)
    finally:
        torch.set_default_dtype(prev)
    if checkpoint is None:
        init_random(model, seed)
    else:
        load_weights(model, checkpoint)
    return model.eval()


def check_checkpoint(model_dir: str, random_weights: bool = False) -> ModelConfig:
    """config.json, the safetensors index, each shard's header, and every tensor's name and shape against the whole
    model (built on the meta device, so nothing is allocated or read); returns the config. With random_weights
    only config.json is read. Raises ConfigError or CheckpointError naming the field or file."""
    config = ModelConfig.from_pretrained(model_dir)
    if not random_weights:
        checkpoint = Checkpoint(model_dir)
        with torch.device("meta"):
            model = CausalLM(config)
        load_weights(model, checkpoint, read=False)
    return config
