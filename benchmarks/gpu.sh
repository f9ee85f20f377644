#!/usr/bin/env bash
# The prepared GPU check (issue 14): one GPU, under 8 minutes; prints the figures and writes
# benchmarks/results/gpu.json (see benchmarks/gpu.py for what is measured).
#
#   bash benchmarks/gpu.sh
#
# It uses the machine's GPU build of jax when there is one (installing the project's other
# requirements beside it, from PyPI or, offline, from wheels in .whl/), else installs the CUDA 13
# build of the pinned jax. Without a visible NVIDIA GPU (nvidia-smi) it stops first, installing
# nothing (for a check of the script itself on any machine: python -m benchmarks.gpu --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! nvidia-smi --query-gpu=name --format=csv,noheader >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no NVIDIA GPU found (nvidia-smi missing or failing); nothing installed or run" >&2
  exit 1
fi
# The requirements this machine lacks (by distribution name), never jax or jaxlib: installing the
# pinned CPU build over a GPU one would take the GPU away.
missing=$(python3 - <<'PY'
import importlib.metadata as m, re
for line in open("requirements.txt"):
    name = re.split(r"[=<>; ]", line.strip())[0]
    if not name or name.startswith("#") or name in ("jax", "jaxlib"):
        continue
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(line.strip())
PY
)
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  pip install -q "jax[cuda13]==$(sed -n 's/^jax==//p' requirements.txt)"
fi
if [ -n "$missing" ]; then
  pip install -q --no-deps $missing 2>/dev/null || pip install -q --no-deps --no-index --find-links .whl $missing
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONUNBUFFERED=1
timeout 480 python3 -m benchmarks.gpu "$@"
