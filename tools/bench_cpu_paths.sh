#!/usr/bin/env bash
# Which CPU path trains ResNet-32 (batch 64) fastest on this machine? fp32 NCHW vs channels-last, one process
# with every core vs one single-thread process per core (grids' --jobs), bf16 autocast, torch.compile.
# Run it on a quiet machine:  bash tools/bench_cpu_paths.sh  (about 5 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
CORES=$(nproc)
STEP=("$PY" tools/bench_train.py --backbones zoo:resnet32 --steps 20)
LOOP=("$PY" tools/bench_train.py --throughput --device cpu --specs resnet32 --batch 64 --images 1000)
echo "== fp32 NCHW, 1 process, $CORES threads (step times)"; OMP_NUM_THREADS=$CORES "${STEP[@]}"
echo "== fp32 channels-last, 1 process, $CORES threads"; OMP_NUM_THREADS=$CORES "${STEP[@]}" --channels-last
echo "== fp32 channels-last, $CORES processes at once, 1 thread each"
for i in $(seq "$CORES"); do OMP_NUM_THREADS=1 "${STEP[@]}" --channels-last > "/tmp/bench_cpu_paths.$i" 2>&1 & done
wait; for i in $(seq "$CORES"); do cat "/tmp/bench_cpu_paths.$i"; rm -f "/tmp/bench_cpu_paths.$i"; done
echo "== bf16 autocast + channels-last, $CORES threads (the training loop, DataLoader and resident data)"
OMP_NUM_THREADS=$CORES "${LOOP[@]}" --compile off --steps 5
echo "== the same with torch.compile (rows started within 300 s)"
OMP_NUM_THREADS=$CORES "${LOOP[@]}" --compile on --steps 10 --seconds 300
