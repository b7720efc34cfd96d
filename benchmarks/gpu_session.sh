#!/usr/bin/env bash
# One GPU session's measurements in a few minutes (docs/performance.md records them): the GPU's and the
# software's versions, the kernel tests at real sizes in fp32/fp16/bf16, the attention and whole-model
# benchmarks, and the service on the GPU against the raw model. Each step is timed, has its own time
# limit (together under 10 minutes; about 5 expected on an H200, not yet timed on one) and its log in
# the output folder; a failed step does not stop the next; the exit status is 1 when any failed, and
# the last line names them.
#
#   benchmarks/gpu_session.sh [OUT]                     # OUT: the argument, else $OUT, else gpu-results
#   PY=.venv/bin/python benchmarks/gpu_session.sh       # python: $PY, else python3
#   WHEELS=gpu-wheels benchmarks/gpu_session.sh         # a python without the service's packages (make gpu-wheels):
#                                                       # the ones it lacks go to $SITE (/tmp/halo-site), on PYTHONPATH
set -euo pipefail

PY=${PY:-python3}
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
wheels=${WHEELS:+$(cd "$WHEELS" && pwd)}
cd "$(dirname "$0")/.."  # the repository root: python -m app and the benchmarks run from the source tree
failed=()

# step NAME SECONDS COMMAND...: runs COMMAND under timeout, its output shown and kept in $out/NAME.log,
# its exit status and seconds in $out/steps.tsv; a failure is recorded and the session goes on.
step() {
    local name=$1 limit=$2 started=$SECONDS rc=0
    shift 2
    echo "== $name (at most $limit s): $*"
    # SIGTERM at the limit, SIGKILL 30 s later: time for the service benchmark to stop its servers.
    if timeout --kill-after=30 "$limit" "$@" 2>&1 | tee "$out/$name.log"; then rc=0; else rc=${PIPESTATUS[0]}; fi
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" >> "$out/steps.tsv"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    if ((rc != 0)); then failed+=("$name"); fi
}

versions='
import platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "CUDA", torch.version.cuda)
import triton
print("triton", triton.__version__)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA GPU")
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
'
printf 'name\texit\tseconds\n' > "$out/steps.tsv"
echo "$0 $* at $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(nproc) cores" \
    | tee "$out/session.txt"
step nvidia-smi 20 nvidia-smi
if [[ -n $wheels ]]; then
    site=${SITE:-/tmp/halo-site}
    step wheels 60 "$PY" -m benchmarks.offline_wheels "$wheels" "$site"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
step versions 30 "$PY" -c "$versions"

# The Triton kernel's tests, and every unit test file that skips without a GPU (the CUDA engine's too).
mapfile -t gpu_tests < <({ echo tests/unit/test_triton_kernel.py; grep -lE 'cuda\.is_available\(\)' tests/unit/*.py; } \
    | sort -u)
step kernel-tests 120 "$PY" -m pytest -q -x -rs "${gpu_tests[@]}"
step attention 90 "$PY" -m benchmarks.attention --device cuda --rounds 5 --seconds 0.5 --json "$out/attention.json"
# The issue's targets: halonet26t at batch 64 against timm in the same dtype, in NCHW and in channels_last (ours'
# layout); the script times fp16 and bf16. No compiled contenders: a minute of compile each.
step model 90 "$PY" -m benchmarks.model --device cuda --models halonet26t --batch 64 \
    --contenders timm timm_channels_last ours --rounds 3 --seconds 1.5 --json "$out/model.json"
step service 180 "$PY" -m benchmarks.service --device cuda --seconds 8 --json "$out/service.json"

echo "== done in $SECONDS s; logs and JSON in $out"
if ((${#failed[@]})); then
    echo "== failed: ${failed[*]}"
    exit 1
fi
