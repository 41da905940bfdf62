"""Every method's objective against its paper's formula, computed by hand; what its gradients reach; its
schedules; and the presets' expansion from one spec."""

import math

import pytest
import torch

from dksgraph.augmented import augment
from dksgraph.errors import SpecError
from dksgraph.loss import SynergyLoss
from dksgraph.objective import PRESETS, resolve_objective, sdn_weights
from dksgraph.spec import parse_spec

NAMES = ["main", "c2", "c3"]
TARGET = torch.tensor([0, 3, 1, 1, 2])


def fixed(requires_grad=False, dim=6):
    gen = torch.Generator().manual_seed(7)
    logits = {n: (2 * torch.randn(5, 4, generator=gen)).requires_grad_(requires_grad) for n in NAMES}
    feats = {n: torch.randn(5, dim, generator=gen).requires_grad_(requires_grad) for n in NAMES}
    return logits, feats


def spec(method, **extra):
    data = {"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32], "kwargs": {"num_classes": 10}},
            "taps": [{"at": "layer2", "name": "c2", "depth": [5], "width": [2.0]}, {"at": "layer1", "name": "c3"}],
            "train": {"method": method}}
    for key, value in extra.items():
        data[key] = value
    return parse_spec(data)


def loss_for(method, total_steps=1, seed=0, **extra):
    return SynergyLoss(objective=resolve_objective(spec(method, **extra), NAMES[1:]), total_steps=total_steps,
                       seed=seed)


# ----------------------------------------------------------------- the formulas, one number at a time

def ce(row, y):
    return -(row[y] - math.log(sum(math.exp(v) for v in row)))


def soft(row, T):
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def h(p, q):
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q))


def mean_over_batch(fn):
    return sum(fn(i) for i in range(len(TARGET))) / len(TARGET)


def rows(logits, name, i):
    return logits[name][i].tolist()


def byot_by_hand(logits, feats, a=0.3, T=3.0, lam=0.03):
    """BYOT: CE(main) + sum_i [(1-a) CE_i + a H(softmax(z_main/T), softmax(z_i/T))] + l sum_i ||f_i - f_main||^2
    (the features given here are the adapters' outputs)."""
    total = mean_over_batch(lambda i: ce(rows(logits, "main", i), TARGET[i].item()))
    for c in NAMES[1:]:
        total += mean_over_batch(lambda i: (1 - a) * ce(rows(logits, c, i), TARGET[i].item())
                                 + a * h(soft(rows(logits, "main", i), T), soft(rows(logits, c, i), T)))
        total += lam * mean_over_batch(lambda i: sum((u - v) ** 2 for u, v in zip(feats[c][i].tolist(),
                                                                                    feats["main"][i].tolist())))
    return total


def test_byot_equals_its_formula():
    logits, feats = fixed()
    out = loss_for("byot")(logits, TARGET, features=feats)
    assert out.total.item() == pytest.approx(byot_by_hand(logits, feats), abs=1e-6, rel=1e-6)


def test_the_t_squared_choice():
    logits, _ = fixed()
    squared = loss_for("dks", synergy={"temperature": 4.0})(logits, TARGET).total.item()
    plain = loss_for("dks", synergy={"temperature": 4.0, "temperature_squared": False})(logits, TARGET).total.item()
    ce_part = sum(mean_over_batch(lambda i: ce(rows(logits, c, i), TARGET[i].item())) for c in NAMES)
    pairs = [(m, n) for m in NAMES for n in NAMES if m != n]
    syn = sum(mean_over_batch(lambda i: h(soft(rows(logits, m, i), 4.0), soft(rows(logits, n, i), 4.0)))
              for m, n in pairs)
    assert squared == pytest.approx(ce_part + 16 * syn, rel=1e-6)
    assert plain == pytest.approx(ce_part + syn, rel=1e-6)


@pytest.mark.parametrize("method", ["dks", "dhm"])
def test_dks_and_dhm_equal_the_dks_formula(method):
    logits, _ = fixed()
    out = loss_for(method)(logits, TARGET).total.item()
    pairs = [(m, n) for m in NAMES for n in NAMES if m != n]
    expected = sum(mean_over_batch(lambda i: ce(rows(logits, c, i), TARGET[i].item())) for c in NAMES)
    expected += sum(mean_over_batch(lambda i: h(soft(rows(logits, m, i), 1.0), soft(rows(logits, n, i), 1.0)))
                    for m, n in pairs)
    assert out == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("step,progress", [(0, 0.0), (50, 0.5), (100, 1.0)])
def test_sdn_equals_its_formula_along_the_ramp(step, progress):
    logits, _ = fixed()
    out = loss_for("sdn", total_steps=101)(logits, TARGET, step=step).total.item()
    finals = {"c2": 0.3, "c3": 0.15}  # 0.15 x i from the shallowest: c3 is the first internal classifier
    expected = mean_over_batch(lambda i: ce(rows(logits, "main", i), TARGET[i].item()))
    for c, final in finals.items():
        weight = min(final, 0.01 + final * progress)
        expected += weight * mean_over_batch(lambda i: ce(rows(logits, c, i), TARGET[i].item()))
    assert out == pytest.approx(expected, rel=1e-6)


def test_sdn_final_weights_grow_with_depth_as_in_the_release():
    assert sdn_weights(6)[::-1] == [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    assert resolve_objective(spec("sdn"), ["c2", "c3"]).ce == {"main": 1.0, "c2": 0.3, "c3": 0.15}


def test_ensemble_teacher_is_the_detached_mean_softmax():
    logits, _ = fixed(requires_grad=True)
    loss = loss_for("dks", synergy={"pairs": "ensemble", "temperature": 2.0, "temperature_squared": False})
    out = loss(logits, TARGET).total
    expected = sum(mean_over_batch(lambda i: ce(rows(logits, c, i), TARGET[i].item())) for c in NAMES)
    for c in NAMES:
        def term(i):
            mean = [sum(soft(rows(logits, m, i), 2.0)[k] for m in NAMES) / 3 for k in range(4)]
            return h(mean, soft(rows(logits, c, i), 2.0))
        expected += mean_over_batch(term)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    out.backward()  # the teacher side is detached: each classifier's gradient is its CE's plus its own student term
    lone = {n: v.detach().clone().requires_grad_(True) for n, v in logits.items()}
    teacher = torch.stack([(lone[n] / 2).softmax(-1) for n in NAMES]).mean(0).detach()
    for c in NAMES:
        part = torch.nn.functional.cross_entropy(lone[c], TARGET) - (teacher * (lone[c] / 2).log_softmax(-1)).sum(
            -1).mean()
        part.backward()
        assert torch.allclose(logits[c].grad, lone[c].grad, atol=1e-6)


def test_an_explicit_pair_may_have_the_ensemble_teach_but_not_learn():
    loss = loss_for("dks", synergy={"pairs": [["ensemble", "c3"]]})
    assert loss.pairs == [("ensemble", "c3")]
    with pytest.raises(SpecError, match="can teach but not learn"):
        spec("dks", synergy={"pairs": [["c3", "ensemble"]]})


# ----------------------------------------------------------------- what the gradients reach

def test_byot_gradients_teachers_and_main_feature_detached():
    logits, feats = fixed(requires_grad=True)
    loss_for("byot")(logits, TARGET, features=feats).total.backward()
    alone = logits["main"].detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(alone, TARGET).backward()
    assert torch.allclose(logits["main"].grad, alone.grad, atol=1e-7)  # main: its CE only, never a student
    assert feats["main"].grad is None  # the hint's target is detached
    assert all(feats[c].grad.abs().sum() > 0 for c in NAMES[1:])


def test_adapters_learn_only_through_the_hint():
    model = augment(spec("byot"))
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for weight, reached in ((0.03, True), (0.0, False)):
        loss = loss_for("byot", objective={"hint_weight": weight})
        loss.hints = True  # the model's adapters exist; compute the hint at weight 0 to see what it reaches
        model.zero_grad(set_to_none=True)
        model.train()
        logits, feats = model.logits_and_features(x)
        loss(logits, y, features=feats).total.backward()
        grads = [model.branches[c].adapter.weight.grad for c in NAMES[1:]]
        assert all((g is not None and g.abs().sum() > 0) == reached for g in grads)
        # the backbone's head (main's classifier) gets no gradient from any hint: its input is detached there
    model.zero_grad(set_to_none=True)
    logits, feats = model.logits_and_features(x)
    hint_only = sum(((feats[c] - feats["main"].detach()) ** 2).sum(-1).mean() for c in NAMES[1:])
    hint_only.backward()
    assert model.backbone.fc.weight.grad is None
    assert model.branches["c2"].head.fc.weight.grad is None  # a branch's classifier is after its pooled feature


def test_adapter_shapes_map_each_branch_feature_to_mains():
    model = augment(spec("byot"))
    assert {k for k in model.state_dict() if "adapter" in k} == {"branches.c2.adapter.weight",
                                                                  "branches.c3.adapter.weight"}
    assert model.branches["c2"].adapter.weight.shape == (64, 128)  # c2 is 2x wide; main's feature is 64
    assert model.branches["c3"].adapter.weight.shape == (64, 64)
    assert not any("adapter" in k for k in augment(spec("dks")).state_dict())


# ----------------------------------------------------------------- schedules and pair drop

def test_pair_drop_is_seeded_by_step_and_run_and_drops_whole_terms():
    loss = loss_for("dhm", synergy={"pair_drop": 0.5}, seed=3)
    masks = [loss.kept_pairs(step) for step in range(200)]
    assert torch.equal(masks[17], loss_for("dhm", synergy={"pair_drop": 0.5}, seed=3).kept_pairs(17))
    assert not torch.equal(torch.stack(masks), torch.stack([loss_for("dhm", synergy={"pair_drop": 0.5},
                                                                      seed=4).kept_pairs(s) for s in range(200)]))
    rate = 1 - torch.stack(masks).float().mean().item()
    assert 0.4 < rate < 0.6
    logits, _ = fixed()
    step = next(s for s, m in enumerate(masks) if 0 < m.sum() < len(m))
    full = loss_for("dhm")(logits, TARGET)
    dropped = loss(logits, TARGET, step=step)
    names = loss.names
    for k, (t, s) in enumerate(loss.pairs):
        value = dropped.components[names.index(f"synergy/{t}->{s}")]
        want = full.components[names.index(f"synergy/{t}->{s}")] if masks[step][k] else torch.tensor(0.0)
        assert torch.allclose(value, want)


def test_constant_weights_do_not_depend_on_the_step():
    logits, _ = fixed()
    loss = loss_for("dks", total_steps=10)
    assert torch.equal(loss(logits, TARGET, step=0).total, loss(logits, TARGET, step=9).total)


# ----------------------------------------------------------------- presets from one spec

@pytest.mark.parametrize("method", list(PRESETS))
def test_every_preset_expands_and_prints_one_line_per_term(method):
    obj = resolve_objective(spec(method), ["c2", "c3"])
    lines = obj.describe()
    assert lines[0] == f"objective: {method}"
    taps = 0 if method == "baseline" else 2
    assert sum("x CE(" in line for line in lines) == 1 + taps
    assert sum("x H(softmax(" in line for line in lines) == len(obj.pairs)
    assert sum("adapter_" in line for line in lines) == (2 if method == "byot" else 0)


def test_spec_fields_override_a_preset_but_not_what_defines_a_method():
    obj = resolve_objective(spec("byot", synergy={"temperature": 4.0}, taps=[{"at": "layer2", "name": "c2",
                                                                              "alpha": 0.5}]), ["c2"])
    assert (obj.temperature, obj.beta, obj.ce["c2"], obj.given) == (4.0, 0.3, 0.5, ("alpha", "temperature"))
    ds = resolve_objective(spec("ds", synergy={"pairs": "bidirectional"}), ["c2", "c3"])
    assert ds.pairs == ()  # deep supervision has no pairs, whatever the spec's synergy says
    old = resolve_objective(spec("dks", synergy={"pairs": "bidirectional", "beta": 1.0, "temperature": 1.0}),
                            ["c2", "c3"])
    new = resolve_objective(spec("dks"), ["c2", "c3"])
    assert (old.pairs, old.beta, old.temperature, old.ce) == (new.pairs, new.beta, new.temperature, new.ce)


def test_hints_on_a_head_without_a_linear_are_refused():
    data = {"backbone": {"model": "torchvision:squeezenet1_1", "kwargs": {"num_classes": 10},
                         "input_size": [3, 96, 96]}, "taps": "auto", "train": {"method": "byot"}}
    with pytest.raises(SpecError, match="hint_weight: 0"):
        augment(parse_spec(data))
    augment(parse_spec({**data, "objective": {"hint_weight": 0}}))


def test_an_exported_branch_classifier_leaves_the_hint_adapters_behind(tmp_path):
    from dksgraph.checkpoint import save_checkpoint
    from dksgraph.deploy import export, load_exported

    byot = spec("byot")
    model = augment(byot)
    save_checkpoint(tmp_path / "byot.pt", byot, model)
    for name in ("c2", "ensemble"):
        written = export(tmp_path / "byot.pt", tmp_path / f"{name}.pt", name)
        state = torch.load(written.path, weights_only=True)
        assert state and not any("adapter" in k for k in state)
        loaded = load_exported(written.path)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            want = model.eval().logits(x)
            got = loaded(x)
        if name == "c2":
            assert torch.equal(got, want["c2"])


def test_hints_on_a_vision_transformer_read_the_class_token():
    data = {"backbone": {"model": "torchvision.models.vision_transformer:VisionTransformer",
                         "kwargs": {"image_size": 32, "patch_size": 8, "num_layers": 3, "num_heads": 2,
                                    "hidden_dim": 48, "mlp_dim": 96, "num_classes": 5}, "input_size": [3, 32, 32]},
            "taps": "auto", "train": {"method": "byot"}}
    torch.manual_seed(0)
    model = augment(parse_spec(data)).train()
    x = torch.randn(2, 3, 32, 32)
    logits, feats = model.logits_and_features(x)
    assert set(feats) == set(model.classifiers) and all(f.shape == (2, 48) for f in feats.values())
    tokens = {}
    hook = model.backbone.heads.head.register_forward_hook(lambda m, args, out: tokens.setdefault("cls", args[0]))
    model.eval()
    with torch.no_grad():
        _, eval_feats = model.logits_and_features(x)
    hook.remove()
    assert torch.equal(eval_feats["main"], tokens["cls"])  # what enters main's final Linear: the class token
    out = SynergyLoss.for_model(model)(logits, torch.tensor([0, 1]), features=feats)
    assert torch.isfinite(out.total) and out.components[SynergyLoss.for_model(model).names.index("hint/c2")] > 0
