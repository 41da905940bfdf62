#!/usr/bin/env bash
# One command for a machine with one CUDA GPU: does dksgraph work there, and how fast?  (make gpu-check)
#
#   bash tools/gpu_check.sh [--cifar TARBALL] [--wheels DIR] [--out DIR] [--python PY] [--minutes N] [--dry-run]
#
# Needs a Python with PyTorch and torchvision (timm optional), no network: dksgraph's other dependencies
# come from a wheels folder that `make wheels` fills on a machine with internet (copy it along), and the
# CIFAR-10 JPEG tarball (../shared/data/cifar10-jpeg.tar.gz, --cifar or $DKS_CIFAR). Steps, in at most
# --minutes (default 10) of wall time:
#   1. a venv in the results folder that sees the host's PyTorch; dksgraph installed into it from this
#      checkout with `pip install --no-index --find-links WHEELS -e .`
#   2. the test suite's `cuda` tests (fp16 + GradScaler, bf16, channels-last, compile, one-process NCCL DDP,
#      resume GPU<->CPU, eval of a GPU checkpoint on CPU, the GPU-resident data path)
#   3. the throughput table (tools/bench_train.py --throughput)
#   4. the evidence run: baseline, DS and DKS ResNet-32 on CIFAR-10 at once on the GPU, epochs chosen to fit
#      the time left, scored on the 10,000 test images, report.md and curves (tools/reproduce.py)
# Results (summary.md first) go to the folder printed at the start and at the end.
# --dry-run does the same on the CPU with tiny budgets, so that the test suite can keep it working.
set -uo pipefail
ARGS="$*"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=${DKS_WHEELS:-$ROOT/wheels}
CIFAR=${DKS_CIFAR:-$ROOT/../shared/data/cifar10-jpeg.tar.gz}
MINUTES=10
DRY=0
OUT=""
usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cifar) CIFAR=$2; shift 2 ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --python) PY=$2; shift 2 ;;
        --minutes) MINUTES=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
START=$(date +%s)
OUT=${OUT:-$ROOT/gpu-check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[$(elapsed) s] $*"; }
die() { echo "gpu_check: $*" >&2; exit 2; }
say "dksgraph GPU check; results in $OUT"

# 0. what it needs ------------------------------------------------------------------------------------------------------
[ -f "$CIFAR" ] || die "the CIFAR-10 JPEG tarball is not at $CIFAR; pass --cifar PATH or set DKS_CIFAR (the
project's copy is ../shared/data/cifar10-jpeg.tar.gz)."
ls "$WHEELS"/pydantic-*.whl >/dev/null 2>&1 || die "no wheels in $WHEELS; on a machine with internet run
\`make wheels\` (or python tools/wheels.py --python X.Y for this server's Python), copy wheels/ here, or pass --wheels DIR."
"$PY" -c "import torch, torchvision" 2>/dev/null || die "$PY has no PyTorch and torchvision; pass --python PY."
if [ "$DRY" = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    die "$PY's PyTorch sees no CUDA GPU (use --dry-run to try the steps on the CPU)."
fi

# 1. a venv that sees the host's PyTorch, dksgraph installed from the checkout, offline ---------------------------------
VENV=$OUT/venv
"$PY" -m venv "$VENV" || die "could not create a venv with $PY"
"$PY" -c "import site; print('\n'.join(site.getsitepackages()))" \
    > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_host_site.pth"
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" -e "$ROOT" \
        > "$OUT/install.log" 2>&1; then
    tail -20 "$OUT/install.log" >&2
    die "installing dksgraph from $WHEELS failed (log: $OUT/install.log); the wheels may be for another Python
(this one: $("$PY" -V)); make them with python tools/wheels.py --python X.Y."
fi
VPY=$VENV/bin/python
"$VPY" - > "$OUT/environment.txt" <<'EOF'
import platform, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, CUDA {torch.version.cuda}")
else:
    print(f"CPU only, {torch.get_num_threads()} threads (dry run)")
EOF
cat "$OUT/environment.txt"
say "installed dksgraph into $VENV"
cd "$ROOT"
FAILED=()

# 2. the cuda tests -------------------------------------------------------------------------------------------------------
"$VPY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py > "$OUT/cuda_tests.txt" 2>&1 || FAILED+=(cuda-tests)
say "cuda tests: $(tail -1 "$OUT/cuda_tests.txt")"

# 3. the throughput table -----------------------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then BENCH=(--batch 8 --steps 2 --images 64 --compile off); else BENCH=(--steps 30); fi
"$VPY" tools/bench_train.py --throughput --device "$DEVICE" --save "$OUT/throughput" "${BENCH[@]}" \
    > "$OUT/throughput.log" 2>&1 || FAILED+=(throughput)
[ -f "$OUT/throughput.md" ] && cat "$OUT/throughput.md"
say "throughput table done"

# 4. the evidence run: baseline, DS, DKS at once on the GPU, epochs fitted to the time left -----------------------------
DATA=$OUT/data/cifar10
mkdir -p "$DATA" && tar xzf "$CIFAR" -C "$DATA" || die "could not extract $CIFAR"
LEFT=$(( MINUTES * 60 - $(elapsed) ))
if [ "$DRY" = 1 ]; then
    EPOCHS=1; RUN=(--jobs 3 --train-subset 256 --test-subset 256)
else
    EPOCHS=$("$VPY" - "$OUT/throughput.json" "$LEFT" <<'EOF'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
left = float(sys.argv[2])
rate = min(r["images_per_s"] for r in rows if r["backbone"] == "zoo:resnet32" and r["data"] == "device"
           and not r["compile"])  # DKS, the slowest of the three
share = rate / 3                     # three processes share the GPU
epoch_s = 1.25 * (50_000 + 10_000 / 3) / share   # training + per-epoch scoring, with a margin
print(max(1, int((left - 90) / epoch_s)))        # 90 s: start-up, decoding, final scoring, report
EOF
) || EPOCHS=1
    RUN=(--gpus 0,0,0)
fi
say "evidence run: $EPOCHS epochs for baseline, DS and DKS at once ($LEFT s of the ${MINUTES}-minute budget left)"
"$VPY" tools/reproduce.py specs/grids/gpu_cifar10.yaml --epochs "$EPOCHS" --data-dir "$DATA" \
    --runs-dir "$OUT/runs" --report-dir "$OUT/evidence" "${RUN[@]}" > "$OUT/evidence.log" 2>&1 || FAILED+=(evidence)
say "evidence run done"

# summary ------------------------------------------------------------------------------------------------------------------
{
    echo "# dksgraph GPU check$([ "$DRY" = 1 ] && echo " (dry run on the CPU)")"
    echo
    echo "- command: \`bash tools/gpu_check.sh $ARGS\`, $(date -u +%Y-%m-%dT%H:%MZ), $(elapsed) s"
    echo "- commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    sed 's/^/- /' "$OUT/environment.txt"
    echo "- failed steps: ${FAILED[*]:-none}"
    echo
    echo "## cuda tests"
    echo
    echo '```'
    tail -15 "$OUT/cuda_tests.txt"
    echo '```'
    echo
    echo "## throughput"
    echo
    cat "$OUT/throughput.md" 2>/dev/null || echo "(failed; see throughput.log)"
    echo
    echo "## evidence run (epochs: $EPOCHS)"
    echo
    cat "$OUT/evidence/report.md" 2>/dev/null || { echo '```'; tail -30 "$OUT/evidence.log"; echo '```'; }
} > "$OUT/summary.md"
rm -rf "$OUT/data"
say "results in $OUT (summary.md)${FAILED[*]:+; failed: ${FAILED[*]}}"
[ ${#FAILED[@]} -eq 0 ]
