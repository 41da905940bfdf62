"""The `dksgraph` command line: inspect, augment, strip, schema.

Every user mistake ends with a one-paragraph message on stderr and exit status 2.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import click

from dksgraph.errors import DksError


class _Group(click.Group):
    """Turns a DksError anywhere in a command into its message and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DksError as exc:
            click.echo(textwrap.fill(f"Error: {exc}", width=100), err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dksgraph")
def cli() -> None:
    """Deeply-supervised Knowledge Synergy (CVPR 2019) for any CNN, by torch.fx graph surgery.

    \b
    Typical flow:
      dksgraph inspect torchvision:resnet50 --input-size 3 224 224   # where can branches go?
      dksgraph augment specs/resnet32.yaml --render                  # branches, sizes, picture
      dksgraph augment specs/resnet18.yaml --save init.pt            # an untrained checkpoint
      dksgraph strip init.pt -o resnet18.pt                          # the original network back
    """


def _load(target: str, input_size: tuple[int, ...] | None, num_classes: int | None, taps: str | None = None):
    """A Spec from a YAML path, or a minimal one around a model name (everything else defaulted)."""
    from dksgraph.spec import load_spec, parse_spec

    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        spec = load_spec(target)
        updates = {}
        if input_size:
            updates["input_size"] = list(input_size)
        if num_classes:
            updates["kwargs"] = {**spec.backbone.kwargs, "num_classes": num_classes}
        if updates:
            spec = spec.model_copy(update={"backbone": spec.backbone.model_copy(update=updates)})
        if taps:
            spec = parse_spec({**spec.model_dump(mode="json"), "taps": _taps(taps)}, source=target)
        return spec
    zoo = target.startswith("zoo:")
    backbone = {"model": target, "input_size": list(input_size or ((3, 32, 32) if zoo else (3, 224, 224)))}
    if num_classes:
        backbone["kwargs"] = {"num_classes": num_classes}
    return parse_spec({"backbone": backbone, "taps": _taps(taps or "auto")}, source=target,
                      default_name=target.split(":")[-1])


def _taps(text: str):
    """`auto`, or a comma-separated list of tap points (each labelled by its name)."""
    if text.strip() == "auto":
        return "auto"
    return [{"at": at.strip()} for at in text.split(",") if at.strip()]


_input_size = click.option("--input-size", nargs=3, type=click.IntRange(min=1), metavar="C H W",
                           help="Trace at this input size (default: the spec's; 3 32 32 for zoo:, else 3 224 224).")
_num_classes = click.option("--num-classes", type=click.IntRange(min=1), help="Override the classifier size.")


@cli.command()
@click.argument("target", metavar="SPEC_OR_MODEL")
@_input_size
@_num_classes
@click.option("--all", "show_all", is_flag=True, help="Also list the cut points inside blocks.")
def inspect(target: str, input_size, num_classes, show_all: bool) -> None:
    """List the valid taps of a backbone: shape, downsampling count, stage, and the auto choice.

    SPEC_OR_MODEL is a spec file or a model name such as `zoo:resnet32`, `torchvision:resnet50`,
    `timm:resnet50d` or `package.module:factory`.
    """
    from dksgraph.graph import trace
    from dksgraph.models import build_backbone
    from dksgraph.summary import TAP_HEADERS, format_table, tap_rows

    spec = _load(target, input_size, num_classes)
    model = build_backbone(spec.backbone)
    t = trace(model, spec.backbone.input_size, spec.backbone.leaf_modules)
    auto = t.auto_taps()
    click.echo(f"{spec.backbone.model} at input {'x'.join(map(str, t.input_size))}: "
               f"{len(t.order)} graph nodes, {len(t.cut_points)} cut points, {len(t.blocks)} blocks")
    click.echo(format_table(tap_rows(t, {node: label for label, node, _ in auto}, show_all), TAP_HEADERS))
    click.echo(f"\nfinal feature map: {t.alias(t.final)} ({'x'.join(map(str, t.shapes[t.final]))}, "
               f"d={t.d[t.final]}); head: {', '.join(t.head)}")
    click.echo("stages: " + "; ".join(f"d={s.d} {s.name} ({len(s.blocks)} blocks"
                                      f"{', strided' if s.downsamples else ''})" for s in t.stages))
    for label, node, reason in auto:
        click.echo(f"auto {label}: {t.alias(node)} - {reason}")
    click.echo("Use any name of the `tap` or `node` column as `at:` in a spec.")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False), required=False)
@click.option("--model", help="Instead of a spec: a model name (e.g. torchvision:convnext_tiny); the rest defaults.")
@click.option("--taps", "taps_text", metavar="auto|A,B", help="With --model (or to override a spec): `auto` or "
              "comma-separated tap points.")
@_input_size
@_num_classes
@click.option("--render", "do_render", is_flag=True, help="Draw the augmented graph with graphviz.")
@click.option("--format", "fmt", type=click.Choice(["svg", "png", "pdf", "dot"]), default="svg", show_default=True,
              help="Picture format for --render.")
@click.option("--detail", is_flag=True, help="With --render, expand every block into its operations.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for the rendered picture.")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the untrained model as a dksgraph/1 checkpoint.")
@click.option("--seed", type=int, help="Seed for branch initialisation (default: the spec's train.seed).")
def augment(spec_path: str | None, model: str | None, taps_text: str | None, input_size, num_classes,
            do_render: bool, fmt: str, detail: bool, out_dir: str, save: str | None, seed: int | None) -> None:
    """Trace the spec's backbone, attach its branches and print a summary per classifier.

    \b
      dksgraph augment specs/densenet100.yaml --render
      dksgraph augment --model torchvision:convnext_tiny --taps auto --render
    """
    import torch

    from dksgraph.augment import augment as build
    from dksgraph.summary import CLASSIFIER_HEADERS, classifier_rows, format_table

    if (spec_path is None) == (model is None):
        raise DksError("give either a spec file (`dksgraph augment specs/resnet32.yaml`) or `--model NAME` "
                       "(`dksgraph augment --model torchvision:resnet50 --taps auto`), not both or neither.")
    spec = _load(spec_path or model, input_size, num_classes, taps_text)
    torch.manual_seed(spec.train.seed if seed is None else seed)
    model = build(spec)
    rows, footer = classifier_rows(model)
    click.echo(f"{spec.display_name}: {spec.backbone.model} at input {'x'.join(map(str, spec.backbone.input_size))}, "
               f"taps {'auto' if spec.taps == 'auto' else 'from the spec'}")
    click.echo(format_table(rows, CLASSIFIER_HEADERS))
    click.echo(footer)
    pairs = ", ".join(f"{a}->{b}" for a, b in model.pairs) or "none (deep supervision only)"
    click.echo(f"synergy pairs ({spec.synergy.pairs if isinstance(spec.synergy.pairs, str) else 'explicit'}, "
               f"beta={spec.synergy.beta:g}, T={spec.synergy.temperature:g}): {pairs}")
    if spec.taps == "auto":
        for label, node, reason in model.traced.auto_taps():
            click.echo(f"auto {label}: {model.traced.alias(node)} - {reason}")
    if do_render:
        from dksgraph.render import render

        path, rendered = render(model, out_dir, fmt, detail)
        if rendered:
            click.echo(f"rendered {path}")
        else:
            click.echo(f"wrote {path} (graphviz's `dot` program is not installed, so no {fmt} picture). Install "
                       f"graphviz (`apt-get install graphviz`, `brew install graphviz` or `conda install graphviz`), "
                       f"then run: dot -T{fmt} {path} -o {path.with_suffix('.' + fmt)}")
    if save:
        from dksgraph.train.checkpoint import save_checkpoint

        path = save_checkpoint(save, spec, model, epoch=0, metrics={})
        click.echo(f"saved untrained checkpoint {path}")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (default: CHECKPOINT's name with `.stripped.pt`).")
@click.option("--format", "fmt", type=click.Choice(["state_dict", "torchscript"]), default="state_dict",
              show_default=True, help="state_dict loads into the model's own class with weights_only=True.")
def strip(checkpoint: str, output: str | None, fmt: str) -> None:
    """Remove every branch, verify the original network bit for bit, and write it."""
    from dksgraph.strip import export, load_augmented
    from dksgraph.strip import strip as do_strip

    source = Path(checkpoint)
    out = Path(output) if output else source.with_name(
        source.stem + (".stripped.pt" if fmt == "state_dict" else ".stripped.torchscript.pt"))
    if out.resolve() == source.resolve():
        raise DksError(f"the output `{out}` is the checkpoint itself; give another path with `-o`.")
    augmented, ckpt = load_augmented(source)
    original = do_strip(augmented)
    path = export(original, out, augmented.spec, fmt)
    n = sum(p.numel() for p in original.parameters())
    dropped = sum(p.numel() for p in augmented.branches.parameters())
    click.echo(f"verified: stripped {augmented.spec.backbone.model} equals the augmented `main` output bit for bit "
               f"(eval mode, {'x'.join(map(str, augmented.spec.backbone.input_size))} input)")
    click.echo(f"wrote {path} ({fmt}, {n / 1e6:.3f}M parameters; dropped {len(augmented.branches)} branches with "
               f"{dropped / 1e6:.3f}M parameters; epoch {ckpt.get('epoch', '?')})")


@cli.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False), required=False)
@click.option("--method", type=click.Choice(["dks", "ds", "baseline"]), default="dks", show_default=True,
              help="dks: taps + synergy pairs; ds: taps, no pairs (deep supervision); baseline: no taps.")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<spec name>-<method>).")
@click.option("--resume", type=click.Path(dir_okay=False), help="Continue the run of this last.pt exactly.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in --out.")
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "imagenet", "imagefolder", "synthetic"]),
              help="Default: the spec's train.dataset.")
@click.option("--data-dir", type=click.Path(), help="Default: the spec's train.data_dir.")
@_num_classes
@click.option("--epochs", type=click.IntRange(min=1), help="Default: the spec's train.epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Global batch size (split over processes).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Default: the spec's learning rate.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), help="Linear LR warm-up (default: the spec's).")
@click.option("--seed", type=int, help="Default: the spec's train.seed.")
@click.option("--train-subset", type=click.IntRange(min=1), help="Train on a fixed random subset of N images.")
@click.option("--test-subset", type=click.IntRange(min=1),
              help="Score each epoch on a fixed random subset of N test images (the same for every seed).")
@click.option("--limit-train-batches", type=click.IntRange(min=1), help="At most N training batches per epoch.")
@click.option("--limit-eval-batches", type=click.IntRange(min=1), help="At most N evaluation batches per epoch.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none", show_default=True,
              help="Automatic mixed precision (fp16 uses a GradScaler and needs CUDA).")
@click.option("--channels-last", is_flag=True, help="NHWC memory format (faster convolutions on recent GPUs).")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option("--workers", type=click.IntRange(min=0), help="Data-loading processes (default: 4 on CUDA, 0 on CPU).")
def train(spec_path, method, out, resume, overwrite, dataset, data_dir, num_classes, epochs, batch_size, lr,
          warmup_epochs, seed, train_subset, test_subset, limit_train_batches, limit_eval_batches, device, amp, channels_last, use_compile,
          workers) -> None:
    """Train the spec's backbone with DKS (or DS / the plain baseline) on CPU, a GPU, or DDP via torchrun.

    \b
      dksgraph train specs/resnet32.yaml --method dks --out runs/r32-dks
      dksgraph train --resume runs/r32-dks/last.pt
      torchrun --nproc-per-node 8 -m dksgraph train specs/resnet50.yaml
    """

    from dksgraph.spec import load_spec, parse_spec
    from dksgraph.train import distributed
    from dksgraph.train.checkpoint import load_checkpoint
    from dksgraph.train.engine import RunConfig, Trainer, prepare_run_folder
    from dksgraph.train.metrics import SUMMARY_HEADERS, summary_rows
    from dksgraph.summary import format_table

    ckpt = None
    if resume:
        ckpt = load_checkpoint(resume)
        if "config" not in ckpt or "optimizer" not in ckpt:
            raise DksError(f"`{resume}` is an untrained checkpoint with no training state; start a run from its "
                           "spec instead of resuming it.")
        spec = parse_spec(ckpt["spec"], source=f"{resume} (its spec)")
        config = RunConfig.from_dict(ckpt["config"])
        config.out = str(Path(resume).parent)
        if epochs:
            config.epochs = epochs
    else:
        if spec_path is None:
            raise DksError("give a spec file (e.g. `dksgraph train specs/resnet32.yaml`) or `--resume last.pt`.")
        spec = load_spec(spec_path)
        if num_classes:
            spec = spec.model_copy(update={"backbone": spec.backbone.model_copy(
                update={"kwargs": {**spec.backbone.kwargs, "num_classes": num_classes}})})
        t = spec.train
        if lr:
            t = t.model_copy(update={"optimizer": t.optimizer.model_copy(update={"lr": lr})})
        if warmup_epochs is not None:
            t = t.model_copy(update={"schedule": t.schedule.model_copy(update={"warmup_epochs": warmup_epochs})})
        spec = spec.model_copy(update={"train": t})
        config = RunConfig(
            method=method, out=out or f"runs/{spec.display_name}-{method}", dataset=dataset or t.dataset,
            data_dir=data_dir or t.data_dir, epochs=epochs or t.epochs, batch_size=batch_size or t.batch_size,
            seed=t.seed if seed is None else seed, train_subset=train_subset, test_subset=test_subset,
            limit_train_batches=limit_train_batches, limit_eval_batches=limit_eval_batches, device=device,
            amp=amp, channels_last=channels_last, compile=use_compile, workers=workers)
        if distributed.from_env().is_main:
            prepare_run_folder(Path(config.out), overwrite)
    trainer = Trainer(spec, config, resume=ckpt)
    try:
        if trainer.world.is_main:
            click.echo(f"training {spec.display_name} ({config.method}) on {trainer.device} x{trainer.world.size}: "
                       f"{len(trainer.data.train)} train / {len(trainer.data.test)} test images, "
                       f"epochs {trainer.epoch + 1}..{config.epochs}, run folder {config.out}")
        try:
            history = trainer.fit()
        except KeyboardInterrupt:
            if trainer.world.is_main:
                click.echo(f"\ninterrupted; continue with: dksgraph train --resume {Path(config.out) / 'last.pt'}",
                           err=True)
            raise SystemExit(130) from None
        if trainer.world.is_main and history:
            click.echo(format_table(summary_rows(history, trainer.loss_fn.classifiers + ["ensemble"]),
                                    SUMMARY_HEADERS))
            click.echo(f"checkpoints: {Path(config.out) / 'last.pt'}, {Path(config.out) / 'best.pt'}; "
                       f"metrics: {Path(config.out) / 'metrics.csv'}")
    finally:
        distributed.teardown()


@cli.command(name="eval")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--dataset", type=click.Choice(["cifar10", "cifar100", "imagenet", "imagefolder", "synthetic"]),
              help="Default: the dataset the run trained on.")
@click.option("--data-dir", type=click.Path(), help="Default: the run's data folder.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--limit-eval-batches", type=click.IntRange(min=1), help="At most N evaluation batches.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the accuracies to this JSON file.")
def evaluate(checkpoint, dataset, data_dir, batch_size, limit_eval_batches, device, json_out) -> None:
    """Top-1 / top-5 accuracy of every classifier of a checkpoint, and of their ensemble, on the whole test set."""
    from dksgraph.spec import parse_spec
    from dksgraph.summary import format_table
    from dksgraph.train.checkpoint import load_checkpoint
    from dksgraph.train.engine import RunConfig, Trainer

    ckpt = load_checkpoint(checkpoint)
    spec = parse_spec(ckpt["spec"], source=f"{checkpoint} (its spec)")
    config = RunConfig.from_dict(ckpt.get("config", {}))
    config.method = "ds" if spec.taps else "baseline"
    config.dataset = dataset or config.dataset
    config.data_dir = data_dir or config.data_dir
    config.batch_size, config.device, config.compile = batch_size, device, False
    config.test_subset = None
    trainer = Trainer(spec, config)
    from dksgraph.strip import load_augmented_state

    load_augmented_state(trainer.model, ckpt["model"], checkpoint)
    record = trainer.evaluate(limit_eval_batches)
    names = [*trainer.loss_fn.classifiers, "ensemble"]
    rows = [[n, f"{record[f'test/acc1/{n}']:.2f}", f"{record[f'test/acc5/{n}']:.2f}"]
            for n in names if f"test/acc1/{n}" in record]
    click.echo(f"{spec.display_name} ({ckpt.get('method', '?')}), epoch {ckpt.get('epoch', '?')}, "
               f"{config.dataset} test set ({len(trainer.data.test)} images"
               f"{f', first {limit_eval_batches} batches' if limit_eval_batches else ''}):")
    click.echo(format_table(rows, ["classifier", "top-1 %", "top-5 %"]))
    if json_out:
        from dksgraph.train.checkpoint import atomic_write

        record.update({"epoch": ckpt.get("epoch"), "images": len(trainer.data.test), "dataset": config.dataset,
                       "limit_eval_batches": limit_eval_batches})
        atomic_write(json_out, lambda f: f.write((json.dumps(record, indent=1) + "\n").encode()))
        click.echo(f"wrote {json_out}")


@cli.command()
@click.option("--indent", type=int, default=2, show_default=True)
def schema(indent: int) -> None:
    """Print the spec's JSON Schema (for editors' YAML language servers)."""
    from dksgraph.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=indent))


def main() -> None:
    cli(prog_name="dksgraph")


if __name__ == "__main__":
    main()
