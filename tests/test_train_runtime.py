"""The training runtime: DDP, seeds, resume rules, loaders, evaluating anywhere."""

import json
import os
import socket
import subprocess
import sys
import time
import tomllib

import pytest
import torch
from conftest import ROOT, image_folder, write
from PIL import Image
from test_train import TOY, config, interrupted_run, toy
from torch import nn

from dksgraph.augmented import augment
from dksgraph.checkpoint import link_file, load_checkpoint
from dksgraph.loss import SynergyLoss
from dksgraph.spec import RECIPE_OVERRIDES, load_spec, parse_spec
from dksgraph.train import distributed, engine, seeds
from dksgraph.train.data import LoaderBatches, Normalizer, ShardSampler, default_workers, load_split, transforms_for
from dksgraph.train.engine import EpochOptions, configure_backends, train_one_epoch
from dksgraph.train.runconfig import RunConfig
from dksgraph.train.trainer import Trainer

GOOGLENET = """
name: gnet
backbone: {model: "torchvision:googlenet", kwargs: {num_classes: 10, aux_logits: true, init_weights: true},
           input_size: [3, 64, 64]}
train: {dataset: synthetic, batch_size: 8, epochs: 1}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd, nproc=2, env=None, module=True, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests"), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *(["-m", "dksgraph"] if module else []), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# 1. parameters that never reach the loss --------------------------------------------------------------------------

def test_ddp_trains_googlenet_whose_aux_heads_never_reach_the_loss(tmp_path):
    write(tmp_path / "g.yaml", GOOGLENET)
    done = torchrun(["train", "g.yaml", "--limit-train-batches", 3, "--limit-eval-batches", 1, "--out", "ddp",
                     "--device", "cpu"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "never reach the loss; DDP ignores them" in done.stdout and "backbone.aux1" in done.stdout
    ckpt = load_checkpoint(tmp_path / "ddp" / "last.pt")
    torch.manual_seed(0)
    initial = augment(parse_spec(ckpt["spec"])).state_dict()
    aux = [k for k in initial if k.startswith("backbone.aux1.conv.conv")]
    moved = [k for k in initial if k.startswith("backbone.conv1.conv")]
    assert aux and all(torch.equal(initial[k], ckpt["model"][k]) for k in aux)  # kept their values
    assert not all(torch.equal(initial[k], ckpt["model"][k]) for k in moved)  # the rest trained


def test_unused_parameter_probe_names_the_aux_heads_and_leaves_no_trace():
    model = augment(parse_spec(__import__("yaml").safe_load(GOOGLENET)))
    loss = SynergyLoss.for_model(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    rng = torch.get_rng_state()
    unused = distributed.unused_parameters(model, loss, x, torch.zeros(2, dtype=torch.long))
    aux = {n for n, _ in model.named_parameters() if n.startswith(("backbone.aux1.", "backbone.aux2."))}
    assert set(unused) == aux
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics restored
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


# 2. RNG state of this rank's own device only ------------------------------------------------------------------------

def test_rng_state_is_this_devices_only_and_restores_on_other_machines(monkeypatch):
    set_calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.full((4,), 7, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append((state, device)))
    assert "cuda" not in seeds.rng_state(torch.device("cpu"))
    saved = seeds.rng_state(torch.device("cuda", 3))
    assert torch.equal(saved["cuda"], torch.full((4,), 7, dtype=torch.uint8))  # one state, not a list per GPU
    seeds.set_rng_state(saved, torch.device("cpu"))  # a GPU run resumed on a CPU
    assert set_calls == []
    seeds.set_rng_state(saved, torch.device("cuda", 0))
    assert len(set_calls) == 1 and set_calls[0][1] == torch.device("cuda", 0)
    # an earlier release saved every visible GPU's state; a machine with fewer GPUs takes its own entry or none
    old = {**saved, "cuda": [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]}
    seeds.set_rng_state(old, torch.device("cuda", 1))
    assert torch.equal(set_calls[-1][0], torch.full((4,), 1, dtype=torch.uint8))
    seeds.set_rng_state({**old, "cuda": old["cuda"][:1]}, torch.device("cuda", 5))
    assert len(set_calls) == 2


# 3. eval anywhere / 12. resume rules ----------------------------------------------------------------------------------

def gpu_like(path, out):
    """A checkpoint as a GPU run with every runtime option would write it."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(device="cuda", amp="fp16", channels_last=True, compile=True, workers=8, sync_bn=True,
                          data_on_device=True)
    torch.save(ckpt, out)
    return ckpt


def test_a_gpu_runs_checkpoint_evaluates_and_resumes_on_cpu(run, tmp_path):
    last = interrupted_run(tmp_path / "r")
    (tmp_path / "g").mkdir()
    gpu_like(last, tmp_path / "g" / "last.pt")
    assert run("eval", "r/last.pt", "--device", "cpu", "--json", "plain.json").exit_code == 0
    evaluated = run("eval", "g/last.pt", "--json", "gpu.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert "on cpu" in evaluated.output
    assert json.loads((tmp_path / "gpu.json").read_text()) == json.loads((tmp_path / "plain.json").read_text())
    refused = run("train", "--resume", "g/last.pt", "--device", "cpu")
    assert refused.exit_code == 2 and "`--amp bf16` or `--amp none`" in refused.output
    resumed = run("train", "--resume", "g/last.pt", "--device", "cpu", "--amp", "none", "--no-compile",
                  "--no-channels-last", "--no-sync-bn", "--no-data-on-device", "--workers", 0)
    assert resumed.exit_code == 0, resumed.output
    config = load_checkpoint(tmp_path / "g" / "last.pt")["config"]
    assert config["amp"] == "none" and config["device"] == "cpu" and config["workers"] == 0


def test_resume_refuses_recipe_changes_and_takes_runtime_ones(run, tmp_path):
    last = interrupted_run(tmp_path / "r")
    before = last.read_bytes()
    for flags in (["--lr", 0.5], ["--batch-size", 32], ["--seed", 3], ["--dataset", "cifar10"], ["--epochs", 5],
                  ["--train-subset", 100], ["--method", "ds"]):
        refused = run("train", "--resume", "r/last.pt", *flags)
        assert refused.exit_code == 2, flags
        assert f"`{flags[0]} {flags[1]}` would change the recipe" in refused.output
        assert last.read_bytes() == before
    resumed = run("train", "--resume", "r/last.pt", "--lr", 0.05, "--epochs", 2, "--limit-train-batches", 1,
                  "--data-dir", "elsewhere")  # the run's own values, a runtime change, a new data location
    assert resumed.exit_code == 0, resumed.output
    ckpt = load_checkpoint(last)
    assert ckpt["config"]["limit_train_batches"] == 1 and ckpt["spec"]["train"]["data_dir"] == "elsewhere"
    assert ckpt["history"][-1]["epoch"] == 2


# 4. the dependency floor that torch.amp.GradScaler needs ---------------------------------------------------------------

def test_dependency_floor_has_torch_amp_gradscaler():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {d.split(">=")[0]: tuple(int(p) for p in d.split(">=")[1].split(".")[:2]) for d in deps if ">=" in d}
    assert floors["torch"] >= (2, 3) and floors["torchvision"] >= (0, 18)  # torch.amp.GradScaler("cuda") is 2.3+
    assert torch.amp.GradScaler("cuda", enabled=False) is not None


# 5. training drops the last partial batch, evaluation keeps every image ---------------------------------------------

def test_training_drops_the_partial_batch_and_evaluation_keeps_every_image(tmp_path):
    trainer = Trainer(toy(batch_size=100), config(tmp_path / "d", limit_train_batches=None))
    train_sizes = [len(y) for _, y in trainer.train_batches]
    test_sizes = [len(y) for _, y in trainer.test_batches]
    assert train_sizes == [100] * 10  # 1024 images: 24 dropped, no batch of 24
    assert sum(test_sizes) == 256 and test_sizes[-1] == 56


# 6. rank 0 downloads, the others wait ------------------------------------------------------------------------------------

DOWNLOAD = """
import os, sys, time
import torch
from torchvision import datasets
from dksgraph.train import data, distributed
from dksgraph.train.runconfig import RunConfig

root = sys.argv[1]

class Fake:
    def __init__(self, root, train, transform, download):
        rank = os.environ["RANK"]
        if not download and not os.path.exists(os.path.join(root, "done")):
            raise RuntimeError("Dataset not found")
        if download:
            time.sleep(1.0)
            open(os.path.join(root, "done"), "w").close()
        with open(os.path.join(root, "calls.txt"), "a") as f:
            f.write(f"{rank} {download} {time.time()}\\n")

datasets.CIFAR10 = Fake
distributed.setup(torch.device("cpu"), RunConfig().collective_timeout)
data._cifar("cifar10", root, True, None)
distributed.teardown(finished=True)
"""


def test_only_rank_0_downloads_and_the_others_wait(tmp_path):
    script = write(tmp_path / "download.py", DOWNLOAD)
    (tmp_path / "data").mkdir()
    done = torchrun([script, tmp_path / "data"], tmp_path, module=False)
    assert done.returncode == 0, done.stderr[-3000:]
    calls = [line.split() for line in (tmp_path / "data" / "calls.txt").read_text().splitlines()]
    by_rank = {rank: (download, float(t)) for rank, download, t in calls}
    assert by_rank["0"][0] == "True" and by_rank["1"][0] == "False"
    assert by_rank["1"][1] >= by_rank["0"][1]


# 7. buffers agree across ranks / 8. seeds differ across ranks ------------------------------------------------------

def test_ddp_ranks_draw_their_own_dropout_and_the_saved_model_is_the_evaluated_one(tmp_path, run):
    spec = {**TOY, "backbone": {**TOY["backbone"], "model": "toynets:recording_drop_net"}}
    write(tmp_path / "toy.yaml", json.dumps(spec))
    (tmp_path / "masks").mkdir()
    done = torchrun(["train", "toy.yaml", "--epochs", 1, "--limit-train-batches", 3, "--out", "ddp", "--device", "cpu"],
                    tmp_path, env={"DKS_TEST_RECORD": str(tmp_path / "masks")})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    masks = [(tmp_path / "masks" / f"rank{r}.txt").read_text().splitlines()[-3:] for r in (0, 1)]
    assert all(a != b for a, b in zip(*masks))  # the three training steps: different masks on each rank
    logged = load_checkpoint(tmp_path / "ddp" / "last.pt")["metrics"]
    alone = run("eval", "ddp/last.pt", "--json", "alone.json", "--batch-size", 8)  # one process, whole test set
    assert alone.exit_code == 0, alone.output
    scored = json.loads((tmp_path / "alone.json").read_text())
    for name in ("main", "c2", "c3", "ensemble"):
        assert scored[f"test/acc1/{name}"] == logged[f"test/acc1/{name}"], name


def test_process_seeds_differ_by_rank_and_epoch():
    keys = [(s, e, seeds.PROCESS, r) for s in (0, 1) for e in (0, 1) for r in (0, 1)]
    assert len({seeds.derive(*k) for k in keys}) == len(keys)


# 9. data order: SeedSequence, not seed + epoch --------------------------------------------------------------------

def test_data_order_of_seed_s_epoch_e_is_not_seed_s_plus_1_epoch_e_minus_1():
    for s in range(3):
        for e in range(1, 4):
            assert seeds.epoch_order(100, s, e)[0].tolist() != seeds.epoch_order(100, s + 1, e - 1)[0].tolist()
    shards = [ShardSampler(10, r, 3, shuffle=True, seed=0).keys() for r in range(3)]
    flat = [k for shard in zip(*shards) for k in shard]
    order, sample_seeds = seeds.epoch_order(10, 0, 0)
    assert [i for i, _ in flat][:10] == order.tolist() and [s for _, s in flat][:10] == sample_seeds.tolist()


def test_augmentation_is_a_function_of_seed_and_epoch_not_of_workers():
    spec = toy()
    recipe = spec.train.model_copy(update={"augmentation": "cifar"})
    dataset, _ = load_split(recipe, (3, 32, 32), 10, "train")
    norm = Normalizer((0.5,) * 3, (0.25,) * 3, torch.device("cpu"))

    def epoch_batches(workers, epoch):
        batches = LoaderBatches(dataset, 64, ShardSampler(len(dataset), seed=0), norm, torch.device("cpu"), workers,
                                train=True)
        batches.set_epoch(epoch)
        return [x for x, _ in batches][:3]

    main_process, two_workers = epoch_batches(0, 0), epoch_batches(2, 0)
    assert all(torch.equal(a, b) for a, b in zip(main_process, two_workers))
    assert not torch.equal(main_process[0], epoch_batches(0, 1)[0])


# 10. module swaps take effect ----------------------------------------------------------------------------------------

def test_a_module_swapped_into_the_backbone_is_the_one_called():
    from toynets import CountingBatchNorm

    model = augment(parse_spec({"backbone": {"model": "toynets:odd_net", "input_size": [3, 32, 32]}}))
    x = torch.randn(2, 3, 32, 32)
    model.backbone.stage1[0].bn = CountingBatchNorm(8)
    CountingBatchNorm.calls = 0
    model.train()(x)
    model.eval()(x)
    assert CountingBatchNorm.calls == 2


def test_convert_sync_batchnorm_takes_effect_in_backbone_and_branches():
    model = augment(parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    called = set()
    syncs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
    assert any(n.startswith("backbone.") for n, _ in syncs) and any(n.startswith("branches.") for n, _ in syncs)
    for name, m in syncs:
        m.register_forward_hook(lambda mod, i, o, name=name: called.add(name))
    got = model(x)
    assert called == {n for n, _ in syncs}
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_sync_bn_on_cpu_is_refused(run, tmp_path):
    write(tmp_path / "toy.yaml", json.dumps(TOY))
    result = run("train", "toy.yaml", "--sync-bn", "--device", "cpu", "--out", "r")
    assert result.exit_code == 2 and "`--sync-bn`" in result.output and "needs CUDA" in result.output
    assert not (tmp_path / "r" / "last.pt").exists()


# 11. the paper's ImageNet pipelines ---------------------------------------------------------------------------------

def test_imagenet_pipelines_are_the_papers():
    from torchvision import transforms as T
    from torchvision.transforms import functional as F

    gen = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (300, 600, 3), dtype=torch.uint8, generator=gen).numpy())
    resized = F.pil_to_tensor(F.resize(image, [256, 256]))
    evaluated = transforms_for("imagenet", (3, 224, 224), train=False)(image)
    assert torch.equal(evaluated, F.center_crop(resized, [224, 224]))  # centre 224 of the 256x256 resize
    torch.manual_seed(1)
    crop = transforms_for("imagenet", (3, 224, 224), train=True)(image)
    crops = [resized[:, i:i + 224, j:j + 224] for i in range(33) for j in range(33)]
    assert any(torch.equal(crop, c) or torch.equal(crop, c.flip(-1)) for c in crops)  # a 224 crop of 256x256
    inception = transforms_for("imagenet_inception", (3, 224, 224), train=True)
    assert isinstance(inception.transforms[0], T.RandomResizedCrop) and inception(image).shape == (3, 224, 224)
    assert load_spec(ROOT / "specs" / "resnet152.yaml").train.augmentation == "imagenet_inception"
    for name in ("resnet18", "resnet50"):
        assert load_spec(ROOT / "specs" / f"{name}.yaml").train.augmentation == "imagenet"


# 13. cuDNN autotuning and TF32 on CUDA, off with --deterministic -----------------------------------------------------

def test_cuda_backends_are_tuned_unless_deterministic():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        configure_backends(torch.device("cuda"), deterministic=False)
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
        configure_backends(torch.device("cuda"), deterministic=True)
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
         torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) = saved


# 14. loaders live across epochs / 15. uint8 leaves the loader ------------------------------------------------------

class PidImages(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return torch.full((3, 4, 4), i, dtype=torch.uint8), os.getpid()


def test_loader_workers_persist_across_epochs():
    batches = LoaderBatches(PidImages(), 4, ShardSampler(32, seed=0), Normalizer((0,) * 3, (1,) * 3, torch.device("cpu")),
                            torch.device("cpu"), workers=2, train=True)
    pids = []
    for epoch in range(3):
        batches.set_epoch(epoch)
        pids.append({int(p) for _, y in batches for p in y})
    assert len(pids[0]) == 2 and pids[0] == pids[1] == pids[2] and os.getpid() not in pids[0]


def test_images_cross_as_uint8_and_are_normalised_on_the_device_like_to_tensor_normalize(tmp_path):
    from torchvision import transforms as T

    image_folder(tmp_path)
    spec = toy(dataset="imagefolder", data_dir=str(tmp_path))
    recipe = spec.train.model_copy(update={"augmentation": "none"})
    dataset, _ = load_split(recipe, (3, 32, 32), 10, "test")
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    batches = LoaderBatches(dataset, 6, ShardSampler(6, shuffle=False), Normalizer(mean, std, torch.device("cpu")),
                            torch.device("cpu"), 0, train=False)
    (raw, _), bad = next(iter(batches.loader))
    assert raw.dtype == torch.uint8 and bad == []
    x, y = next(iter(batches))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    order = ShardSampler(6, shuffle=False).keys()
    want = torch.stack([reference(Image.open(dataset.samples[i][0]).convert("RGB")) for i, _ in order])
    assert torch.allclose(x, want, atol=1e-5)


# 16. compile time apart ----------------------------------------------------------------------------------------------

class SlowFirstCall(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        return self.model(x)


def test_the_first_step_is_timed_apart_and_compiled_parts_are_named(tmp_path):
    trainer = Trainer(toy(), config(tmp_path / "c", limit_train_batches=4))
    record = train_one_epoch(SlowFirstCall(trainer.model), trainer.loss_fn, trainer.optimizer, trainer.train_batches,
                             EpochOptions(steps=4, show_progress=False))
    assert record["train/first_step_s"] >= 0.5
    rest = record["train/seconds"] - record["train/first_step_s"]
    assert record["train/images_per_s"] == pytest.approx(3 * 16 / rest, rel=0.1)  # three steps after the first
    compiled = Trainer(toy(), config(tmp_path / "k", compile=True))
    assert compiled.eval_net is not compiled.model and compiled.train_net is not compiled.model
    assert any("torch.compile" in n and "evaluation" in n for n in compiled.notes)


# 17. eval builds the model and the test set, nothing else -----------------------------------------------------------

def test_eval_builds_only_the_model_and_the_test_set(run, tmp_path, monkeypatch):
    interrupted_run(tmp_path / "r")
    splits = []
    real = engine.load_split
    monkeypatch.setattr(engine, "load_split", lambda *a, **k: splits.append(a[3]) or real(*a, **k))
    from dksgraph.train import optim, trainer

    monkeypatch.setattr(optim, "build", lambda *a, **k: pytest.fail("eval built an optimiser"))
    monkeypatch.setattr(trainer, "Trainer", None)
    result = run("eval", "r/last.pt", "--limit-eval-batches", 1)
    assert result.exit_code == 0, result.output
    assert splits == ["test"]


# 18. best.pt is a link to last.pt, not a second write; default workers -----------------------------------------------

def test_best_is_linked_not_rewritten_and_keeps_its_epoch(tmp_path):
    interrupted_run(tmp_path / "r", at=(1, 0))
    last, best = tmp_path / "r" / "last.pt", tmp_path / "r" / "best.pt"
    assert os.stat(last).st_ino == os.stat(best).st_ino
    before = best.read_bytes()
    write(tmp_path / "r" / "new", "x")
    os.replace(tmp_path / "r" / "new", last)  # the next epoch's save replaces last.pt
    assert best.read_bytes() == before
    link_file(last, best)
    assert best.read_text() == "x" and not [p for p in best.parent.iterdir() if p.name.startswith(".")]


def test_default_workers_scale_with_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(torch.device("cuda")) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers(torch.device("cuda")) == 16
    assert default_workers(torch.device("cpu")) == 0


# Part 2: one recipe, one override rule --------------------------------------------------------------------------------

def test_run_config_holds_runtime_settings_only():
    from dataclasses import fields

    assert not {f.name for f in fields(RunConfig)} & set(RECIPE_OVERRIDES)


def test_epochs_scale_the_milestones_on_the_command_line_as_in_grids(run, tmp_path):
    from dksgraph.experiments import grid as grid_lib

    write(tmp_path / "toy.yaml", json.dumps({**TOY, "train": {**TOY["train"], "schedule": {
        "name": "multistep", "milestones": [1], "gamma": 0.5}}}))
    result = run("train", "toy.yaml", "--epochs", 4, "--limit-train-batches", 1, "--limit-eval-batches", 1,
                 "--out", "r")
    assert result.exit_code == 0, result.output
    cli_spec = load_checkpoint(tmp_path / "r" / "last.pt")["spec"]
    grid_spec = grid_lib.derive_spec(TOY, grid_lib.Variant(name=""), grid_lib.GridTrain(epochs=4), "toy")
    assert cli_spec["train"]["schedule"]["milestones"] == grid_spec["train"]["schedule"]["milestones"] == [2]
