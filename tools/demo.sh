#!/usr/bin/env bash
# The main job end to end, run by `make demo` inside demo/: inspect, augment with pictures, a short
# real DKS training run on CPU, evaluation of every classifier, and strip back to the plain network.
set -euo pipefail
DKS=${DKS:-../.venv/bin/dksgraph}
PY=${PY:-../.venv/bin/python}
SPECS=${SPECS:-../specs}
TARBALL=${DKS_CIFAR:-../../shared/data/cifar10-jpeg.tar.gz}  # the variable tools/gpu_check.sh reads too

$DKS inspect zoo:resnet32
$DKS augment $SPECS/densenet100.yaml --render
$DKS augment $SPECS/resnet32.yaml --render

if [ -f "$TARBALL" ]; then
    if [ ! -d data/cifar10/train ]; then
        mkdir -p data/cifar10
        tar xzf "$TARBALL" -C data/cifar10
    fi
    DATA=(--dataset imagefolder --data-dir data/cifar10 --train-subset 5000)
    echo "training on 5,000 images of the shared CIFAR-10 (JPEG) for 3 epochs; evaluating on its 10,000 test images"
else
    DATA=(--dataset synthetic)
    echo "NOTE: $TARBALL is missing, so the demo trains on synthetic images instead of CIFAR-10" \
         "(DKS_CIFAR=/path/to/cifar10-jpeg.tar.gz make demo uses a copy elsewhere)"
fi
$DKS train $SPECS/resnet32.yaml --method dks --num-classes 10 --epochs 3 "${DATA[@]}" \
    --out runs/resnet32-dks --overwrite
$DKS eval runs/resnet32-dks/best.pt --costs          # every classifier: accuracy, parameters, FLOPs, CPU latency
$DKS strip runs/resnet32-dks/best.pt -o resnet32-dks.pt
$DKS export runs/resnet32-dks/best.pt --classifier c2 --format exported -o resnet32-dks-c2.pt2
$PY -c "
import torch
from dksgraph.models.cifar_resnet import resnet32
m = resnet32(num_classes=10)
m.load_state_dict(torch.load('resnet32-dks.pt', weights_only=True))
print('resnet32-dks.pt loads into the plain CIFAR ResNet-32 (strict, weights_only=True)')
c2 = torch.export.load('resnet32-dks-c2.pt2').module()
print('resnet32-dks-c2.pt2 (the auxiliary classifier c2 alone) runs with torch.export.load:', tuple(c2(torch.randn(2, 3, 32, 32)).shape))
"
echo "demo outputs in demo/: *.augmented.svg, runs/resnet32-dks/ (checkpoints, metrics.csv), resnet32-dks.pt, resnet32-dks-c2.pt2"
