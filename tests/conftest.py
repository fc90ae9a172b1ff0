import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU under Triton's interpreter. Read when triton.language is first imported (its own
    # helpers are kernels too), so before anything imports it.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cluster.tiny_checkpoint import SHAPES, make_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """checkpoint_dir(kind, **overrides) -> a directory with a tiny random checkpoint of that kind, its config
    fields overridden (each made once per session)."""
    made = {}

    def get(kind: str, **overrides):
        key = (kind, *sorted(overrides.items()))
        if key not in made:
            made[key] = make_checkpoint(kind, tmp_path_factory.mktemp(kind), **overrides)
        return made[key]

    return get


@pytest.fixture(params=list(SHAPES))
def kind(request):
    return request.param
