"""The Ray workers' allocator: tcmalloc where the loader finds it, unless turned off or LD_PRELOAD is already set."""

from cluster import malloc


def test_tcmalloc_preloaded_when_found(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(malloc, "find_library", lambda name: f"lib{name}.so.4" if name == "tcmalloc_minimal" else None)
    env, line = malloc.preload_env("tcmalloc")
    assert env == {"LD_PRELOAD": "libtcmalloc_minimal.so.4"} and line.startswith("tcmalloc")


def test_system_malloc_when_chosen_missing_or_preload_set(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(malloc, "find_library", lambda name: f"lib{name}.so.4")
    assert malloc.preload_env("system") == ({}, "the system malloc (resources.malloc: system)")
    monkeypatch.setattr(malloc, "find_library", lambda name: None)
    env, line = malloc.preload_env("tcmalloc")
    assert env == {} and "no tcmalloc" in line
    monkeypatch.setenv("LD_PRELOAD", "/opt/libjemalloc.so")  # the operator's own choice stands (workers inherit it)
    assert malloc.preload_env("tcmalloc") == ({}, "as LD_PRELOAD set here (/opt/libjemalloc.so)")
