#!/usr/bin/env bash
# One command for a machine with one CUDA GPU: does dksgraph work there, and how fast?  (make gpu-check)
#
#   bash tools/gpu_check.sh [--cifar TARBALL] [--wheels DIR] [--out DIR] [--python PY] [--minutes N]
#                           [--budget-tests S] [--budget-throughput S] [--dry-run]
#
# Needs a Python with PyTorch and torchvision (timm optional) and no network. What must travel with the
# checkout (both ignored by git): wheels/ (`make wheels PY_VERSION=X.Y` on a machine with internet, X.Y being
# the server's `python3 --version`) and data/cifar10-jpeg.tar.gz (`make gpu-data`; or --cifar / $DKS_CIFAR).
# Steps, ending by themselves within --minutes (default 9) of wall time, every child killed at its deadline:
#   1. a scratch venv that sees the host's PyTorch; dksgraph's requirements and pytest installed into it from
#      wheels/ (`pip install --no-index`), then dksgraph from the checkout with --no-deps, so pip never
#      re-resolves the pins of the host's own PyTorch build; `pip check` is reported, not enforced
#   2. the test suite's `cuda` tests (fp16 + GradScaler, bf16, channels-last, compile, one-process NCCL DDP,
#      resume GPU<->CPU, eval of a GPU checkpoint on CPU, the GPU-resident data path): --budget-tests s
#   3. the throughput table (tools/bench_train.py --throughput, one try per row): --budget-throughput s
#   4. the evidence run: baseline, DS and DKS ResNet-32 on CIFAR-10 at once on the GPU, epochs sized to the
#      time left, scored on the 10,000 test images (tools/reproduce.py)
# A step that reaches its budget is killed and reported as cut; the others still run. Results: at most 8
# small files in the folder printed at the start and the end (summary.md first: commit, GPU, torch, steps;
# logs cut to their useful tail); the venv, the data and the runs live in a scratch folder that is removed.
# Exit status 0 when every step passed, 1 when one failed or was cut, 2 when the check could not start.
# --dry-run does the same on the CPU with tiny sizes, so that the test suite can keep it working.
set -uo pipefail
ARGS="$*"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${DKS_WHEELS:-$ROOT/wheels}
CIFAR=${DKS_CIFAR:-$ROOT/data/cifar10-jpeg.tar.gz}
MINUTES=9
BUDGET_TESTS=180
BUDGET_THROUGHPUT=150
RESERVE=15  # seconds kept for the summary
DRY=0
OUT=""
usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cifar) CIFAR=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --minutes) MINUTES=$2; shift 2 ;;
        --budget-tests) BUDGET_TESTS=$2; shift 2 ;;
        --budget-throughput) BUDGET_THROUGHPUT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
START=$(date +%s)
OUT=${OUT:-$ROOT/gpu-check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/dksgraph-gpu-check.XXXXXX")
STEP_PID=""
cleanup() {
    [ -n "$STEP_PID" ] && kill -KILL -- "-$STEP_PID" 2>/dev/null
    rm -rf "$SCRATCH"
}
trap cleanup EXIT
trap 'exit 2' INT TERM
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( MINUTES * 60 - RESERVE - $(elapsed) )); }
say() { echo "[$(elapsed) s] $*"; }
die() { echo "gpu_check: $*" >&2; exit 2; }
say "dksgraph GPU check; results in $OUT (at most ${MINUTES} minutes)"

# 0. what it needs ------------------------------------------------------------------------------------------------------
[ -f "$CIFAR" ] || die "the CIFAR-10 JPEG tarball is not at $CIFAR. Copy it there before the checkout travels
(make gpu-data copies ../shared/data/cifar10-jpeg.tar.gz to data/), or pass --cifar PATH / set DKS_CIFAR."
ls "$WHEELS"/pydantic-*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS. On a machine with internet run
\`make wheels PY_VERSION=X.Y\` for this server's Python ($("$PY" -V 2>&1)), let wheels/ travel with the
checkout, or pass --wheels DIR."
"$PY" -c "import torch, torchvision" 2>/dev/null || die "$PY has no PyTorch and torchvision; pass --python PY."
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    die "$PY's PyTorch sees no CUDA GPU (use --dry-run to try the steps on the CPU)."
fi

# run_step NAME BUDGET LOG CMD...: CMD in its own process group, killed (the whole group) at min(BUDGET, time left)
FAILED=()
CUT=()
run_step() {
    local name=$1 budget=$2 log=$3 rc
    shift 3
    local left_now
    left_now=$(left)
    [ "$budget" -gt "$left_now" ] && budget=$left_now
    if [ "$budget" -le 0 ]; then
        echo "(not started: no time left)" > "$log"; CUT+=("$name"); return 1
    fi
    setsid "$@" > "$log" 2>&1 &
    STEP_PID=$!
    local deadline=$(( $(date +%s) + budget ))
    while kill -0 "$STEP_PID" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill -TERM -- "-$STEP_PID" 2>/dev/null
            sleep 3
            kill -KILL -- "-$STEP_PID" 2>/dev/null
            wait "$STEP_PID" 2>/dev/null
            STEP_PID=""
            echo "(cut by gpu_check.sh after its budget of $budget s)" >> "$log"
            CUT+=("$name")
            say "$name: cut after $budget s"
            return 1
        fi
        sleep 1
    done
    wait "$STEP_PID"; rc=$?
    kill -KILL -- "-$STEP_PID" 2>/dev/null  # anything the step left behind
    STEP_PID=""
    [ "$rc" -eq 0 ] || FAILED+=("$name")
    return "$rc"
}

# 1. a venv that sees the host's PyTorch; requirements from wheels/, dksgraph with --no-deps ---------------------------
VENV=$SCRATCH/venv
VPY=$VENV/bin/python
if ! "$PY" -m venv "$VENV" > "$SCRATCH/venv.log" 2>&1; then
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV" >> "$SCRATCH/venv.log" 2>&1 \
        || die "could not create a venv with $PY: $(tail -1 "$SCRATCH/venv.log")"
    say "$PY -m venv has no ensurepip here: a venv without pip, installing with the host's pip"
fi
"$PY" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_host_site.pth"
"$VPY" -m pip --version > /dev/null 2>&1 || die "neither the venv nor $PY has pip; install pip for $PY."
mapfile -t REQS < <("$PY" "$ROOT/tools/wheels.py" --print-requirements)
PIP=("$VPY" -m pip install --disable-pip-version-check --no-input --no-index --find-links "$WHEELS")
if ! run_step install 240 "$SCRATCH/install.log" "${PIP[@]}" "${REQS[@]}" \
        || ! run_step install 120 "$SCRATCH/install_dksgraph.log" "${PIP[@]}" --no-deps -e "$ROOT"; then
    tail -40 "$SCRATCH"/install*.log > "$OUT/install.log"
    die "installing dksgraph's requirements from $WHEELS failed (log: $OUT/install.log); the wheels may be for
another Python (this one: $("$PY" -V 2>&1)); make them with make wheels PY_VERSION=X.Y."
fi
"$VPY" -m pip check > "$SCRATCH/pip_check.txt" 2>&1
{ tail -q -n 8 "$SCRATCH"/install*.log; echo; echo "pip check:"; cat "$SCRATCH/pip_check.txt"; } > "$OUT/install.log"
ENVIRONMENT=$("$VPY" - <<'EOF'
import platform, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
else:
    print(f"CPU only, {torch.get_num_threads()} threads (dry run)")
EOF
)
echo "$ENVIRONMENT"
say "installed $("$VENV/bin/dksgraph" --version 2>&1 | tail -1) into a scratch venv"
cd "$ROOT"

# 2. the cuda tests -------------------------------------------------------------------------------------------------------
run_step cuda-tests "$BUDGET_TESTS" "$SCRATCH/cuda_tests.log" \
    "$VPY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
tail -60 "$SCRATCH/cuda_tests.log" > "$OUT/cuda_tests.log"
say "cuda tests: $(grep -v '^(cut' "$SCRATCH/cuda_tests.log" | tail -1)"

# 3. the throughput table (saved after every row, so a cut table keeps its rows) ----------------------------------------
if [ "$DRY" = 1 ]; then BENCH=(--batch 8 --steps 2 --images 64 --compile off); else BENCH=(--steps 30); fi
run_step throughput "$BUDGET_THROUGHPUT" "$SCRATCH/throughput.log" \
    "$VPY" tools/bench_train.py --throughput --device "$DEVICE" --save "$OUT/throughput" "${BENCH[@]}"
[ -f "$OUT/throughput.md" ] && cat "$OUT/throughput.md"
say "throughput table done"

# 4. the evidence run: baseline, DS, DKS at once on the GPU, epochs sized to the time left -----------------------------
DATA=$SCRATCH/data/cifar10
mkdir -p "$DATA" && tar xzf "$CIFAR" -C "$DATA" || die "could not extract $CIFAR"
LEFT=$(left)
if [ "$DRY" = 1 ]; then
    EPOCHS=1; RUN=(--jobs 3 --train-subset 256 --test-subset 256)
else
    EPOCHS=$("$VPY" - "$OUT/throughput.json" "$LEFT" <<'EOF'
import json, sys
left = float(sys.argv[2])
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    rate = min(r["images_per_s"] for r in rows if r.get("images_per_s") and r["backbone"] == "zoo:resnet32"
               and r["data"] == "device" and not r["compile"])  # DKS, the slowest of the three
except (OSError, ValueError, KeyError):
    rate = 6000.0  # no measured row: a cautious guess for one modern GPU
share = rate / 3                                   # three processes share the GPU
epoch_s = 1.25 * (50_000 + 10_000 / 3) / share     # training + per-epoch scoring, with a margin
print(max(1, int((left - 90) / epoch_s)))          # 90 s: start-up, decoding, final scoring, report
EOF
) || EPOCHS=1
    RUN=(--gpus 0,0,0)
fi
say "evidence run: $EPOCHS epochs for baseline, DS and DKS at once ($LEFT s left)"
run_step evidence "$LEFT" "$SCRATCH/evidence.log" \
    "$VPY" tools/reproduce.py specs/grids/gpu_cifar10.yaml --epochs "$EPOCHS" --data-dir "$DATA" \
    --runs-dir "$SCRATCH/runs" --report-dir "$SCRATCH/evidence" "${RUN[@]}"
tail -80 "$SCRATCH/evidence.log" > "$OUT/evidence.log"
[ -f "$SCRATCH/evidence/report.md" ] && cp "$SCRATCH/evidence/report.md" "$OUT/report.md"
CURVES=$(ls "$SCRATCH"/evidence/curves_*.png 2>/dev/null | head -1)
[ -n "$CURVES" ] && cp "$CURVES" "$OUT/$(basename "$CURVES")"
say "evidence run done"

# summary ------------------------------------------------------------------------------------------------------------------
{
    echo "# dksgraph GPU check$([ "$DRY" = 1 ] && echo " (dry run on the CPU)")"
    echo
    echo "- command: \`bash tools/gpu_check.sh $ARGS\`, $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "$ENVIRONMENT" | sed 's/^/- /'
    echo "- failed steps: ${FAILED[*]:-none}"
    echo "- cut at their time budget: ${CUT[*]:-none}"
    echo "- pip check (reported, not enforced): $(head -5 "$SCRATCH/pip_check.txt" | tr '\n' ' ')"
    echo
    echo "## cuda tests"
    echo
    echo '```'
    tail -15 "$SCRATCH/cuda_tests.log"
    echo '```'
    echo
    echo "## throughput"
    echo
    cat "$OUT/throughput.md" 2>/dev/null || echo "(no rows; see throughput.log)"
    echo
    echo "## evidence run (epochs: $EPOCHS)"
    echo
    if [ -f "$OUT/report.md" ]; then sed 's/^#/##/' "$OUT/report.md"
    else echo '```'; tail -30 "$SCRATCH/evidence.log"; echo '```'; fi
} > "$OUT/summary.md"
[ -f "$OUT/throughput.md" ] || tail -40 "$SCRATCH/throughput.log" > "$OUT/throughput.log"
say "results in $OUT (summary.md)${FAILED[*]:+; failed: ${FAILED[*]}}${CUT[*]:+; cut: ${CUT[*]}}"
[ ${#FAILED[@]} -eq 0 ] && [ ${#CUT[@]} -eq 0 ]
