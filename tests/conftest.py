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
    """checkpoint_dir(kind) -> a directory with a tiny random checkpoint of that kind (made once per session)."""
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = make_checkpoint(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(params=list(SHAPES))
def kind(request):
    return request.param
