import math

import pytest
import torch
import torch.nn.functional as F

from dksgraph.augmented import augment
from dksgraph.loss import SynergyLoss, pair_set
from dksgraph.spec import parse_spec

NAMES = ["main", "c2", "c3"]


def fixed_logits(requires_grad=False):
    gen = torch.Generator().manual_seed(3)
    return {n: (2 * torch.randn(5, 4, generator=gen)).requires_grad_(requires_grad) for n in NAMES}


TARGET = torch.tensor([0, 3, 1, 1, 2])


def by_hand(logits, pairs, alphas=(1.0, 0.5, 0.25), beta=1.0, T=1.0):
    """The paper's formula, one sample and one class at a time."""
    total = 0.0
    for w, name in zip(alphas, NAMES):
        for i, y in enumerate(TARGET.tolist()):
            row = logits[name][i].tolist()
            total += w * -(row[y] - math.log(sum(math.exp(v) for v in row))) / len(TARGET)
    for m, n in pairs:
        for i in range(len(TARGET)):
            zm = [v / T for v in logits[m][i].tolist()]
            zn = [v / T for v in logits[n][i].tolist()]
            p = [math.exp(v) / sum(math.exp(u) for u in zm) for v in zm]
            log_q = [v - math.log(sum(math.exp(u) for u in zn)) for v in zn]
            total += beta * T * T * -sum(pk * lq for pk, lq in zip(p, log_q)) / len(TARGET)
    return total


@pytest.mark.parametrize("pairs", ["bidirectional", "top_down", "bottom_up", "none", [["c3", "main"], ["c2", "c3"]]])
@pytest.mark.parametrize("beta,T", [(1.0, 1.0), (0.5, 3.0)])
def test_loss_equals_hand_computation(pairs, beta, T):
    resolved = pair_set(pairs, NAMES)
    loss = SynergyLoss(NAMES, {"c2": 0.5, "c3": 0.25}, resolved, beta, T)
    logits = fixed_logits()
    out = loss(logits, TARGET)
    assert out.total.item() == pytest.approx(by_hand(logits, resolved, beta=beta, T=T), rel=1e-5)
    assert out.components[0].item() == pytest.approx(out.total.item())
    assert len(out.components) == len(loss.names)


def test_gradient_equals_released_kl_form():
    pairs = pair_set("bidirectional", NAMES)
    logits = fixed_logits(requires_grad=True)
    SynergyLoss(NAMES, None, pairs)(logits, TARGET).total.backward()
    ours = {n: logits[n].grad.clone() for n in NAMES}
    logits = fixed_logits(requires_grad=True)
    kl = sum(F.cross_entropy(logits[n], TARGET) for n in NAMES)
    for m, n in pairs:
        p = F.softmax(logits[m], -1).detach()
        kl = kl + (p * (torch.log(p + 1e-8) - F.log_softmax(logits[n], -1))).sum(-1).mean()
    kl.backward()
    for n in NAMES:
        assert torch.allclose(ours[n], logits[n].grad, atol=1e-6)


def test_kl_and_ce_forms_differ_by_the_teacher_entropy():
    loss = SynergyLoss(NAMES, None, pair_set("top_down", NAMES))
    out = loss(fixed_logits(), TARGET)
    values = dict(zip(loss.names, out.components.tolist()))
    assert values["synergy_ce"] > values["synergy_kl"] >= 0


def test_no_gradient_reaches_the_teacher_through_its_target():
    logits = fixed_logits(requires_grad=True)
    SynergyLoss(NAMES[:2], None, [("main", "c2")])(logits, TARGET).total.backward()
    ce_only = fixed_logits(requires_grad=True)
    F.cross_entropy(ce_only["main"], TARGET).backward()
    assert torch.allclose(logits["main"].grad, ce_only["main"].grad, atol=1e-7)
    assert logits["c2"].grad.abs().sum() > 0


def test_methods_from_one_spec():
    model = augment(parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]},
                                "taps": [{"at": "layer2", "name": "c2", "alpha": 0.3}, {"at": "layer1", "name": "c3"}]}))
    logits = {n: torch.randn(5, 10) for n in model.classifiers}
    y = torch.randint(0, 10, (5,))
    ds = SynergyLoss.for_model(model, "ds")(logits, y).total
    plain = SynergyLoss(model.classifiers, {"c2": 0.3, "c3": 1.0}, [])(logits, y).total
    assert torch.equal(ds, plain)
    expected = F.cross_entropy(logits["main"], y) + 0.3 * F.cross_entropy(logits["c2"], y) + F.cross_entropy(logits["c3"], y)
    assert ds.item() == pytest.approx(expected.item(), rel=1e-6)
    assert SynergyLoss.for_model(model, "baseline")(logits, y).total.item() == pytest.approx(
        F.cross_entropy(logits["main"], y).item(), rel=1e-6)
    assert len(SynergyLoss.for_model(model, "dks").pairs) == 6
