import pytest

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
