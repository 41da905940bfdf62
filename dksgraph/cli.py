"""The `dksgraph` command line: inspect, augment, strip, schema (train and eval: :mod:`dksgraph.train.commands`).

Every user mistake ends with a one-paragraph message on stderr and exit status 2.
"""

from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import click

from dksgraph.errors import DksError
from dksgraph.formatting import fmt_shape
from dksgraph.integrity import UnsealedFile
from dksgraph.names import ENSEMBLE, EXPORT_FORMATS as FORMATS, EXPORT_SUFFIXES as SUFFIXES, MAIN, RENDER_FORMATS, Key
from dksgraph.spec import METHODS

__all__ = ["augment", "cli", "export", "inspect", "main", "schema", "strip", "verify"]


def _paragraph(text: str) -> str:
    return textwrap.fill(text, width=100, break_on_hyphens=False, break_long_words=False)


class _Group(click.Group):
    """Turns a DksError anywhere in a command into its message and its exit status (2 for bad input), and
    a file read without a checksum into one notice."""

    def invoke(self, ctx: click.Context):
        with warnings.catch_warnings():
            warnings.simplefilter("default", UnsealedFile)  # once per file
            shown = warnings.showwarning

            def show(message, category, *args, **kwargs) -> None:
                if issubclass(category, UnsealedFile):
                    click.echo(_paragraph(f"Notice: {message}"), err=True)
                else:
                    shown(message, category, *args, **kwargs)

            warnings.showwarning = show
            try:
                return super().invoke(ctx)
            except DksError as exc:
                click.echo(_paragraph(f"Error: {exc}"), err=True)
                ctx.exit(exc.exit_code)


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
      dksgraph verify runs/r18/*.pt                                  # every file against its checksum
    """


def _load(target: str, input_size: tuple[int, ...] | None, num_classes: int | None, taps: str | None = None,
          method: str | None = None):
    """A Spec from a YAML path, or a minimal one around a model name (everything else defaulted)."""
    from dksgraph.spec import apply_overrides, load_spec, parse_spec

    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        spec = load_spec(target)
    else:
        size = (3, 32, 32) if target.startswith("zoo:") else (3, 224, 224)
        spec = parse_spec({"backbone": {"model": target, "input_size": list(size)}}, source=target,
                          default_name=target.split(":")[-1])
    return apply_overrides(spec, source=target, input_size=input_size or None, num_classes=num_classes,
                           taps=_taps(taps) if taps else None, method=method)


def _taps(text: str):
    """`auto`, or a comma-separated list of tap points (each labelled by its name)."""
    if text.strip() == "auto":
        return "auto"
    return [{"at": at.strip()} for at in text.split(",") if at.strip()]


_input_size = click.option("--input-size", nargs=3, type=click.IntRange(min=1), metavar="C H W",
                           help="Trace at this input size (default: the spec's; 3 32 32 for zoo:, else 3 224 224).")
_num_classes = click.option("--num-classes", type=click.IntRange(min=1), help="Override the classifier size.")
_target = click.argument("target", metavar="SPEC_OR_MODEL", required=False)
_model = click.option("--model", help="A model name instead of SPEC_OR_MODEL (the same thing, spelled as an option).")


def _target_of(command: str, target: str | None, model: str | None) -> str:
    """SPEC_OR_MODEL, given as the argument or as --model (one of them)."""
    if (target is None) == (model is None):
        raise DksError(f"give a spec file or a model name, once: `dksgraph {command} specs/resnet32.yaml`, "
                       f"`dksgraph {command} torchvision:resnet50` or `dksgraph {command} --model torchvision:resnet50`.")
    return target or model


@cli.command()
@_target
@_model
@_input_size
@_num_classes
@click.option("--all", "show_all", is_flag=True, help="Also list the cut points inside blocks.")
def inspect(target: str | None, model: str | None, input_size, num_classes, show_all: bool) -> None:
    """List the valid taps of a backbone: shape, downsampling count, stage, and the auto choice.

    SPEC_OR_MODEL is a spec file or a model name such as `zoo:resnet32`, `torchvision:resnet50`,
    `timm:resnet50d` or `package.module:factory`.
    """
    from dksgraph.formatting import format_table
    from dksgraph.fx.graph import trace
    from dksgraph.models import build_backbone
    from dksgraph.summary import TAP_HEADERS, tap_rows

    spec = _load(_target_of("inspect", target, model), input_size, num_classes)
    model = build_backbone(spec.backbone, pretrained=False)
    t = trace(model, spec.backbone.input_size, spec.backbone.leaf_modules)
    auto = t.auto_taps()
    click.echo(f"{spec.backbone.model} at input {fmt_shape(t.input_size)}: "
               f"{len(t.order)} graph nodes, {len(t.cut_points)} cut points, {len(t.blocks)} blocks")
    click.echo(format_table(tap_rows(t, {node: label for label, node, _ in auto}, show_all), TAP_HEADERS))
    click.echo(f"\nfinal feature map: {t.alias(t.final)} ({fmt_shape(t.shapes[t.final])}, "
               f"d={t.downsamplings[t.final]}); head: {', '.join(t.head)}")
    click.echo("stages: " + "; ".join(f"d={s.downsamplings} {s.name} ({len(s.blocks)} blocks"
                                      f"{', strided' if s.downsamples else ''})" for s in t.stages))
    for label, node, reason in auto:
        click.echo(f"auto {label}: {t.alias(node)} - {reason}")
    click.echo("Use any name of the `tap` or `node` column as `at:` in a spec.")


@cli.command()
@_target
@_model
@click.option("--taps", "taps_text", metavar="auto|A,B", help="With a model name (or to override a spec): `auto` or "
              "comma-separated tap points.")
@_input_size
@_num_classes
@click.option("--render", "do_render", is_flag=True, help="Draw the augmented graph with graphviz.")
@click.option("--format", "fmt", type=click.Choice(RENDER_FORMATS), default="svg", show_default=True,
              help="Picture format for --render.")
@click.option("--detail", is_flag=True, help="With --render, expand every block into its operations.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for the rendered picture.")
@click.option("--save", type=click.Path(dir_okay=False), help="Write the untrained model as a dksgraph/1 checkpoint.")
@click.option("--seed", type=int, help="Seed for branch initialisation (default: the spec's train.seed).")
@click.option("--method", type=click.Choice(METHODS), help="Show (and --save) the model and objective of this "
              "method's preset instead of the spec's train.method.")
def augment(target: str | None, model: str | None, taps_text: str | None, input_size, num_classes,
            do_render: bool, fmt: str, detail: bool, out_dir: str, save: str | None, seed: int | None,
            method: str | None) -> None:
    """Trace the spec's backbone, attach its branches, print a summary per classifier and the objective, one line
    per term with its weight (the method's preset with the spec's overrides).

    SPEC_OR_MODEL is a spec file or a model name (as for `inspect`; `--model NAME` is the same).

    \b
      dksgraph augment specs/densenet100.yaml --render
      dksgraph augment torchvision:convnext_tiny --taps auto --render
    """
    import torch

    from dksgraph.augmented import augment as build
    from dksgraph.formatting import format_table
    from dksgraph.summary import CLASSIFIER_HEADERS, classifier_rows

    spec = _load(_target_of("augment", target, model), input_size, num_classes, taps_text, method)
    torch.manual_seed(spec.train.seed if seed is None else seed)
    model = build(spec)
    rows, footer = classifier_rows(model)
    click.echo(f"{spec.display_name}: {spec.backbone.model} at input {fmt_shape(spec.backbone.input_size)}, "
               f"taps {'auto' if spec.taps == 'auto' else 'from the spec'}")
    click.echo(format_table(rows, CLASSIFIER_HEADERS))
    click.echo(footer)
    click.echo(f"branch initialisation: {model.branch_init}")
    click.echo("\n".join(model.objective.describe()))
    if spec.taps == "auto":
        for plan in model.plans:
            click.echo(f"auto {plan.label}: {plan.tap} - {plan.reason}")
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
        from dksgraph.checkpoint import save_checkpoint

        path = save_checkpoint(save, spec, model, epoch=0, metrics={})
        click.echo(f"saved untrained checkpoint {path}")


def _write_classifier(checkpoint: str, output: str | None, name: str, fmt: str, members: list[str] | None,
                      default_suffix: str) -> None:
    from dksgraph.deploy import BRANCHES, export

    source = Path(checkpoint)
    out = Path(output) if output else source.with_name(source.stem + default_suffix)
    if out.resolve() == source.resolve():
        raise DksError(f"the output `{out}` is the checkpoint itself; give another path with `-o`.")
    done = export(source, out, name, fmt, members)
    ckpt = done.checkpoint
    what = f"`{name}`" + (f" ({', '.join(members)})" if members else "")
    read = ("read after its checksum was verified: " if ckpt.seal.sealed else "read as it is: ") + ckpt.seal.describe()
    click.echo(f"verified: {what} as {fmt}: {done.check.describe()} against the augmented model of `{source}` "
               f"({read})")
    extra = f" and {done.path.name}.json" if fmt == "state_dict" else ""
    click.echo(f"wrote {done.path}{extra}, sealed ({done.parameters / 1e6:.3f}M parameters; epoch "
               f"{ckpt.get('epoch', '?')})")
    if name == MAIN:
        branch_keys = [k for k in ckpt[Key.MODEL] if k.startswith(BRANCHES)]
        labels = {k[len(BRANCHES):].split(".", 1)[0] for k in branch_keys}
        dropped = sum(ckpt[Key.MODEL][k].numel() for k in branch_keys)
        click.echo(f"dropped {len(labels)} branches with {dropped / 1e6:.3f}M values: what remains is the original network")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (default: CHECKPOINT's name with `.stripped.pt`).")
@click.option("--format", "fmt", type=click.Choice(["state_dict", "torchscript"]), default="state_dict",
              show_default=True, help="state_dict loads into the model's own class with weights_only=True.")
def strip(checkpoint: str, output: str | None, fmt: str) -> None:
    """Remove every branch, verify the original network bit for bit, and write it (`export` of `main`)."""
    _write_classifier(checkpoint, output, MAIN, fmt, None,
                      ".stripped.pt" if fmt == "state_dict" else ".stripped.torchscript.pt")


@cli.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--classifier", "name", default=MAIN, show_default=True, metavar="NAME",
              help="main (the original network), an auxiliary classifier (c2, c3, ...) or ensemble.")
@click.option("--classifiers", "members", metavar="A,B", help="With --classifier ensemble: its members (default: all).")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="state_dict", show_default=True,
              help="state_dict (+ JSON sidecar), exported (torch.export), onnx (needs the `export` extra) or "
                   "torchscript.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Output file (default: CHECKPOINT's name with `.NAME` and the format's suffix).")
def export(checkpoint: str, name: str, members: str | None, fmt: str, output: str | None) -> None:
    """Write one classifier of a checkpoint as a standalone model, verified against the augmented model first.

    \b
      dksgraph export runs/r32/best.pt --classifier c2 --format exported
      dksgraph export runs/r32/best.pt --classifier ensemble --classifiers main,c2 --format onnx
    """
    chosen = [m.strip() for m in members.split(",") if m.strip()] if members else None
    if chosen and name != ENSEMBLE:
        raise DksError("`--classifiers` names an ensemble's members; use it with `--classifier ensemble`.")
    _write_classifier(checkpoint, output, name, fmt, chosen, f".{name}{SUFFIXES[fmt]}")


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
def verify(files: tuple[str, ...]) -> None:
    """Check files against the checksum dksgraph sealed them with, without loading them.

    Checkpoints, stripped networks and every export format (a state_dict's JSON sidecar beside it is
    checked with it). One line per file: `ok`, `damaged` and where (the tensor, record or section),
    `no checksum` (written by an earlier release, or by another program) or `missing`. Exit status 0
    only when every file is ok; 1 when one is damaged or carries no checksum; 2 when one is missing.

    \b
      dksgraph verify runs/r32/last.pt runs/r32/best.pt
      dksgraph verify runs/*/*.pt
    """
    from dksgraph.integrity import DamagedFile, verify_file

    worst = 0
    for name in files:
        try:
            seals = verify_file(name)
        except DamagedFile as exc:
            status, detail, code = "damaged", exc.where, 1
        except DksError:
            status, detail, code = "missing", "", 2
        else:
            sealed = all(seal.sealed for seal in seals)
            status, code = ("ok", 0) if sealed else ("no checksum", 1)
            detail = "; ".join(f"{seal.path.name}: {seal.describe()}" if i else seal.describe()
                               for i, seal in enumerate(seals)).removeprefix("no checksum ")
        worst = max(worst, code)
        click.echo(f"{status:<12}{name}" + (f"  {detail}" if detail else ""))
    raise SystemExit(worst)


@cli.command()
@click.option("--indent", type=int, default=2, show_default=True)
def schema(indent: int) -> None:
    """Print the spec's JSON Schema (for editors' YAML language servers)."""
    from dksgraph.spec import json_schema

    click.echo(json.dumps(json_schema(), indent=indent))


def _add_training_commands() -> None:
    from dksgraph.train.commands import evaluate, train

    cli.add_command(train)
    cli.add_command(evaluate)


_add_training_commands()


def main() -> None:
    cli(prog_name="dksgraph")


if __name__ == "__main__":
    main()
