"""A timm backbone with timm's own optimizer and scheduler factories, and an evaluation loop written for plain
networks (the augmented model returns only `main`'s logits in eval mode).

    python examples/timm_model.py                     # timm's resnet18 at 64x64 on synthetic images, seconds
    python examples/timm_model.py --model timm:efficientnet_b0 --steps 200
"""

import argparse

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import accuracy

import dksgraph

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="timm:resnet18")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

spec = dksgraph.parse_spec({"backbone": {"model": args.model, "kwargs": {"num_classes": 10}, "input_size": [3, 64, 64]},
                            "taps": "auto"})
torch.manual_seed(0)
model = dksgraph.augment(spec, eval_output="main")
print("branches:", ", ".join(f"{p.label} at {p.tap} ({p.describe()})" for p in model.plans))
loss_fn = dksgraph.SynergyLoss.for_model(model)
optimizer = create_optimizer_v2(model, opt="sgd", lr=0.05, momentum=0.9, weight_decay=5e-5)
scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.steps, warmup_epochs=1)

images = torch.randn(16 * args.steps, 3, 64, 64)
labels = torch.randint(0, 10, (16 * args.steps,))
model.train()
for step in range(args.steps):
    x, y = images[16 * step:16 * (step + 1)], labels[16 * step:16 * (step + 1)]
    out = loss_fn(model(x), y)
    optimizer.zero_grad()
    out.total.backward()
    optimizer.step()
    scheduler.step(step + 1)
    print(f"step {step + 1}: loss {out.total.item():.3f}, lr {optimizer.param_groups[0]['lr']:.4f}")


def validate(net, x, y):  # any evaluation loop written for a plain classifier
    net.eval()
    with torch.no_grad():
        return accuracy(net(x), y, topk=(1,))[0].item()


print(f"main top-1 on the last batch: {validate(model, x, y):.1f}%")
