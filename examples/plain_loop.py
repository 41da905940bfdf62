"""DKS in your own training loop: augment -> SynergyLoss -> plain SGD -> strip -> export.

    python examples/plain_loop.py                                 # synthetic images, a few seconds
    python examples/plain_loop.py --data data/cifar10 --steps 500 # CIFAR-10 as train/ and test/ class folders

Nothing here is specific to dksgraph's own trainer: the model is an nn.Module returning a dict of
logits, the loss is an nn.Module, and the result is the original ResNet-32 (plus an auxiliary
classifier exported on its own).
"""

import argparse
from pathlib import Path

import torch
import torchvision
from torchvision import transforms as T

import dksgraph

parser = argparse.ArgumentParser()
parser.add_argument("--data", help="a folder with train/ and test/ class folders (default: synthetic images)")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", default="plain-loop")
args = parser.parse_args()

spec = dksgraph.parse_spec({  # CIFAR ResNet-32 with the paper's two branches (specs/resnet32.yaml), 10 classes
    "backbone": {"model": "zoo:resnet32", "kwargs": {"num_classes": 10}, "input_size": [3, 32, 32]},
    "taps": [{"at": "layer2", "name": "c2", "depth": [5], "width": [2.0]}, {"at": "layer1", "name": "c3", "depth": [5, 3]}],
})
torch.manual_seed(0)
model = dksgraph.augment(spec)                                   # {"main", "c2", "c3"} logits in training
loss_fn = dksgraph.SynergyLoss.for_model(model)                  # CE on every classifier + knowledge synergy
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

if args.data:
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
    data = torchvision.datasets.ImageFolder(f"{args.data}/train", tf)
else:
    data = torchvision.datasets.FakeData(512, (3, 32, 32), 10, T.ToTensor())
loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, drop_last=True)

model.train()
step = 0
while step < args.steps:
    for x, y in loader:
        out = loss_fn(model(x), y)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        step += 1
        if step % 10 == 0 or step == args.steps:
            print(f"step {step}: loss {out.total.item():.3f}")
        if step == args.steps:
            break

out_dir = Path(args.out)
out_dir.mkdir(exist_ok=True)
resnet32 = dksgraph.strip(model)                                 # the plain ResNet-32, verified bit for bit
torch.save(resnet32.state_dict(), out_dir / "resnet32.pt")
c2 = dksgraph.export(model, out_dir / "c2.pt2", "c2", "exported")  # the auxiliary classifier on its own
print(f"wrote {out_dir / 'resnet32.pt'} and {c2.path} ({c2.check.describe()})")
print("c2 reloads with no dksgraph import:", torch.export.load(str(c2.path)).module()(torch.randn(1, 3, 32, 32)).shape)
