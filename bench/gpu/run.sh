#!/usr/bin/env bash
# The GPU check of issue 20 (bench/README.md, "GPU check"), for a machine with one GPU whose Python
# has CUDA torch, transformers (>= 5), peft and accelerate, and no network. It installs the rest
# from bench/gpu/wheels (`make gpu-wheels` made it where there was network; carry it along), then
# runs bench/gpu/check.py: ftpipe and TRL's SFTTrainer side by side, LoRA then QLoRA, all within
# GPU_CHECK_SECONDS (default 240, installation included).
#
#     bash bench/gpu/run.sh              # results: $OUT/gpu_check.json where $OUT is set, else bench/gpu/results.json
#     PYTHON=python3.11 bash bench/gpu/run.sh
#     bash bench/gpu/run.sh --cpu-smoke  # the same steps on a machine without a GPU (a tiny model)
#
# Arguments go to check.py. Exit status: 0 when every side ran or was skipped with a reason, 1 when
# one failed, 2 when the machine cannot run the check (the message says why), 124 out of time.
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=bench/gpu/wheels
BUDGET=${GPU_CHECK_SECONDS:-240}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${OUT:-}" ]; then   # the log beside the results
  mkdir -p "$OUT" && exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
fail() { echo "GPU CHECK CANNOT RUN: $*"; exit 2; }
smoke=false
for arg in "$@"; do [ "$arg" = --cpu-smoke ] && smoke=true; done

echo "== environment"
echo "python: $(command -v "$PYTHON") ($("$PYTHON" -V 2>&1))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
"$PYTHON" - <<'EOF' || fail "$PYTHON cannot import torch"
import importlib.metadata as m
for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "pydantic", "liger-kernel",
             "bitsandbytes", "flash-attn"):
    try:
        version = m.version(name)
    except m.PackageNotFoundError:
        version = "-"
    print(f"{name:<13} {version}")
import torch
print(f"CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  fail "the wheels in $WHEELS are CPython 3.11's (ftpipe's Python) and this is $("$PYTHON" -V 2>&1); set PYTHON to a Python 3.11 with CUDA torch"
"$PYTHON" -c 'import sys, transformers; sys.exit(int(transformers.__version__.split(".")[0]) < 5)' ||
  fail "ftpipe needs transformers >= 5"
$smoke || "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
  fail "torch sees no CUDA device (bash bench/gpu/run.sh --cpu-smoke runs the steps on a CPU)"
[ -f "$WHEELS/MANIFEST.txt" ] ||
  fail "no $WHEELS/MANIFEST.txt: run \`make gpu-wheels\` where there is network, and carry bench/gpu/wheels here"

echo "== install, from $WHEELS only"
cat "$WHEELS/MANIFEST.txt"
# trl and pydantic bring the rest of requirements.txt: pip takes from the folder what this Python
# lacks, or has too old, and keeps what it has
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" 'trl==1.16.0' 'pydantic>=2.7,<3' ||
  fail "pip could not install from $WHEELS (above: what it lacked)"
for wheel in "$WHEELS"/liger_kernel-*.whl "$WHEELS"/bitsandbytes-*.whl; do
  [ -e "$wheel" ] || continue
  "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$WHEELS" "$wheel" ||
    echo "note: $(basename "$wheel") did not install (above); the check goes on without it"
done
"$PYTHON" -c 'import services.trainer.training, trl.trainer.sft_trainer' ||
  fail "ftpipe's trainer or TRL's SFTTrainer does not import (above)"

left=$(( BUDGET - SECONDS ))
echo "== check: $left s left of $BUDGET"
# check.py skips a side that would start too late and stops each at its deadline; timeout is the backstop
timeout --kill-after=10 "$left" "$PYTHON" bench/gpu/check.py --deadline $(( left - 10 )) "$@"
status=$?
[ $status = 124 ] && echo "GPU CHECK: stopped at the ${BUDGET} s budget (the sides done so far are in the results)"
exit $status
