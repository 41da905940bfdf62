"""The YAML spec: pydantic models, :func:`load_spec` and :func:`parse_spec`.

Every model forbids unknown keys, so a misspelt field is an error instead of a silent no-op.
``dksgraph schema`` prints :func:`json_schema` for editors' YAML language servers.

Example::

    >>> spec = parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})
    >>> spec.taps, spec.train.method
    ('auto', 'dks')
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt,
                      ValidationError, model_validator)

from dksgraph.errors import SpecError, close_matches
from dksgraph.names import ENSEMBLE, MAIN

__all__ = ["BACKBONE_OVERRIDES", "DATASETS", "METHODS", "RECIPE_OVERRIDES", "BackboneSpec", "OptimizerSpec",
           "ObjectiveSpec", "ScheduleSpec", "Spec", "SynergySpec", "TapSpec", "TrainSpec", "apply_overrides", "check_pairs",
           "describe_errors", "json_schema", "load_spec", "parse_spec", "read_yaml"]

PairSet = Literal["bidirectional", "top_down", "bottom_up", "from_main", "ensemble", "none"]
Method = Literal["dks", "ds", "baseline", "byot", "dhm", "sdn"]
Dataset = Literal["cifar10", "cifar100", "imagenet", "imagefolder", "synthetic"]
Augmentation = Literal["cifar", "imagenet", "imagenet_inception", "none"]
Schedule = Literal["multistep", "step", "cosine"]
METHODS: tuple[str, ...] = get_args(Method)
DATASETS: tuple[str, ...] = get_args(Dataset)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Sizes beyond these are typos, not experiments; refusing them keeps a mistyped spec from building a network
# that fills the machine's memory.
MAX_DEPTH, MAX_WIDTH, MAX_SIDE, MAX_CHANNELS, MAX_CLASSES = 512, 16.0, 2048, 64, 100_000
Depth = Annotated[int, Field(ge=1, le=MAX_DEPTH)]
Width = Annotated[float, Field(gt=0, le=MAX_WIDTH)]


class BackboneSpec(_Strict):
    """The network to augment and the input it is traced at."""

    model: str = Field(description="zoo:NAME | torchvision:NAME | timm:NAME | package.module:callable")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the model factory.")
    input_size: tuple[Annotated[int, Field(ge=1, le=MAX_CHANNELS)], Annotated[int, Field(ge=1, le=MAX_SIDE)],
                      Annotated[int, Field(ge=1, le=MAX_SIDE)]] = Field(
        (3, 224, 224), description="C, H, W used for tracing and shape propagation."
    )
    leaf_modules: list[str] = Field(
        default_factory=list,
        description="Module class names or module paths traced as single nodes (for untraceable code).",
    )
    weights: str | None = Field(
        None, description="Start from pretrained weights: a torchvision weights name (IMAGENET1K_V1, DEFAULT), "
        "`timm`, or a local state_dict / dksgraph checkpoint; the classifier is resized to num_classes.")

    @model_validator(mode="after")
    def _sane_classes(self) -> BackboneSpec:
        classes = self.kwargs.get("num_classes")
        if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                    or not 1 <= classes <= MAX_CLASSES):
            raise ValueError(f"kwargs.num_classes must be a whole number from 1 to {MAX_CLASSES:,}, not {classes!r}")
        return self


class TapSpec(_Strict):
    """One auxiliary classifier: where it taps the backbone and how its branch is sized."""

    at: str = Field(description="FX node name or module path, as `dksgraph inspect` lists them.")
    name: str | None = Field(None, pattern=r"^[^.]+$",
                             description="Label in logs and outputs (no dots); default: `at` with `_` for `.`.")
    depth: list[Depth] | None = Field(None, description=f"Blocks per branch stage (1 to {MAX_DEPTH}).")
    width: list[Width] | None = Field(None, description=f"Channel multiplier per branch stage (up to {MAX_WIDTH:g}).")
    alpha: NonNegativeFloat | None = Field(
        None, description="Weight of this classifier's cross-entropy (default: the method's; 1 for dks).")

    @property
    def label(self) -> str:
        return self.name or self.at.replace(".", "_")

    @model_validator(mode="after")
    def _same_lengths(self) -> TapSpec:
        if self.depth is not None and self.width is not None and len(self.depth) != len(self.width):
            raise ValueError(
                f"depth has {len(self.depth)} entries but width has {len(self.width)}; "
                "give one entry per branch stage in both"
            )
        return self


class SynergySpec(_Strict):
    """Which classifiers teach which (the pair set B) and the synergy weight and temperature. A field left out
    takes the method's value (``train.method``; `dksgraph augment` prints the expanded objective)."""

    pairs: PairSet | list[tuple[str, str]] | None = Field(
        None, description="bidirectional | top_down | bottom_up | from_main (main teaches every tap) | ensemble "
        "(the classifiers' mean softmax teaches each) | none | [[teacher, student], ...] (a teacher may be "
        "`ensemble`). Default: the method's (bidirectional for dks).")
    beta: NonNegativeFloat | None = Field(None, description="Weight of the pair terms (default: the method's).")
    temperature: PositiveFloat | None = Field(None, description="Softmax temperature T (default: the method's).")
    temperature_squared: bool | None = Field(
        None, description="Multiply the pair terms by T^2 (Hinton et al.; default: the method's, off for byot).")
    pair_drop: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        None, description="Probability that a pair term is dropped at a step (DHM's stochastic variant; default 0).")


class ObjectiveSpec(_Strict):
    """The objective's terms beyond cross-entropy and pairs; a field left out takes the method's value."""

    ce_ramp: Literal["constant", "linear"] | None = Field(
        None, description="linear: the taps' cross-entropy weights ramp per step from 0.01 to their value over "
        "training (SDN); default: the method's (constant but for sdn).")
    hint_weight: NonNegativeFloat | None = Field(
        None, description="Weight of the feature hints ||A_c f_c - f_main||^2 (a learned linear adapter per tap; "
        "default: the method's, 0.03 for byot, else 0).")


class OptimizerSpec(_Strict):
    name: Literal["sgd"] = "sgd"
    lr: PositiveFloat = 0.1
    momentum: NonNegativeFloat = 0.9
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 5.0e-4


class ScheduleSpec(_Strict):
    """Learning rate over training: a per-step linear warm-up, then multistep / step decays at epoch
    boundaries or a cosine decay (per step) to zero at the last epoch."""

    name: Schedule = "multistep"
    milestones: list[PositiveInt] = Field(default_factory=lambda: [60, 120, 160])
    step_size: PositiveInt | None = Field(None, description="Epochs between decays for `step`.")
    gamma: PositiveFloat = 0.2
    warmup_epochs: NonNegativeFloat = Field(
        0.0, description="Linear learning-rate warm-up over this many epochs, per step (0: none, as in the paper).")


class TrainSpec(_Strict):
    """The training recipe: everything that decides the data and the optimisation of a run.

    `dksgraph train` flags override these fields (see :func:`apply_overrides`); a checkpoint stores
    the recipe it was trained with, so a resumed run cannot silently change it.
    """

    method: Method = Field("dks", description="A preset over the objective's terms: dks (taps + synergy pairs), "
                           "ds (taps, no pairs), baseline (no taps), byot, dhm, sdn; see README, Methods.")
    dataset: Dataset = "cifar100"
    data_dir: str = "./data"
    epochs: PositiveInt = 200
    batch_size: PositiveInt = Field(128, description="The global batch, split over the processes of a run.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    augmentation: Augmentation = Field(
        "cifar", description="cifar: pad 4, random crop, flip; imagenet: resize to 256x256, random 224 crop, flip "
        "(the paper's ResNet-18/50); imagenet_inception: random-resized 224 crop, flip (the paper's ResNet-152); "
        "none: resize only.")
    seed: NonNegativeInt = 0
    train_subset: PositiveInt | None = Field(None, description="Train on a fixed random subset of N images.")
    test_subset: PositiveInt | None = Field(
        None, description="Score each epoch on a fixed random subset of N test images (the same for every seed).")


class Spec(_Strict):
    """A whole dksgraph experiment: backbone, taps, synergy pairs and training recipe."""

    name: str | None = Field(None, description="Defaults to the spec file's stem.")
    backbone: BackboneSpec
    taps: list[TapSpec] | Literal["auto"] = Field(
        "auto", description="Auxiliary classifiers, or `auto` for the paper's best placement."
    )
    synergy: SynergySpec = Field(default_factory=SynergySpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    branch_copy: Literal["segment", "blocks"] = Field(
        "segment", description="How a branch stage without a block-family builder is made: `segment`, a fresh copy "
        "of the backbone's own graph from the tap to the final feature map; or `blocks`, fresh copies of the "
        "stage's whole blocks (the layout of checkpoints written before segments existed).")
    branch_init: Literal["backbone", "pytorch"] = Field(
        "backbone", description="How fresh branch modules are initialised: like the backbone's own (its init "
        "routine, else Kaiming normal fan-out convolutions), or PyTorch's per-layer defaults.")

    @model_validator(mode="after")
    def _consistent_names(self) -> Spec:
        if self.taps == "auto":
            return self
        labels = [t.label for t in self.taps]
        if MAIN in labels:
            raise ValueError(f"`{MAIN}` is the backbone's own classifier; give the tap another `name`")
        dupes = sorted({n for n in labels if labels.count(n) > 1})
        if dupes:
            raise ValueError(
                f"duplicate tap name(s) {', '.join(dupes)}; every tap needs its own `name` "
                "(two taps at one point need different names)"
            )
        check_pairs(self.synergy.pairs, [MAIN, *labels])
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.backbone.model.split(":")[-1]


def check_pairs(pairs: PairSet | list[tuple[str, str]], classifiers: list[str]) -> None:
    """Refuse an explicit pair list that names a classifier the model does not have."""
    if isinstance(pairs, str) or pairs is None:
        return
    for teacher, student in pairs:
        if student == ENSEMBLE:
            raise ValueError(f"synergy pair [{teacher}, {student}]: `{ENSEMBLE}` can teach but not learn; "
                             "it is the classifiers' mean softmax")
        for who in (teacher, student):
            if who == ENSEMBLE:
                continue
            if who not in classifiers:
                hint = close_matches(who, classifiers)
                raise ValueError(
                    f"synergy pair [{teacher}, {student}] names unknown classifier `{who}`; "
                    f"the classifiers are {', '.join(classifiers)}" + (f" (did you mean {hint}?)" if hint else "")
                )
        if teacher == student:
            raise ValueError(f"synergy pair [{teacher}, {student}] pairs a classifier with itself")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a spec file (what `dksgraph schema` prints)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dksgraph spec"
    return schema


def load_spec(path: str | Path) -> Spec:
    """Read and validate a YAML spec.

    Args:
        path: a YAML file (the shipped ones are in ``specs/``; ``dksgraph schema`` prints the format).

    Returns:
        The validated Spec; its name defaults to the file's stem.

    Raises:
        SpecError: a missing file, bad YAML or an invalid field, named with the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            f"spec file `{path}` does not exist. Check the path; the shipped specs are in `specs/` "
            "(for example `specs/resnet32.yaml`), and `dksgraph schema` prints the format."
        )
    return parse_spec(read_yaml(path), source=str(path), default_name=path.stem)


def read_yaml(path: Path) -> Any:
    """A YAML file's data, or a SpecError naming the line and column of a syntax error."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            f"`{path}` is not valid YAML{where}: {problem}. Fix the syntax there "
            "(indentation, a missing colon or an unclosed bracket are the usual causes)."
        ) from None
    except UnicodeDecodeError:
        raise SpecError(f"`{path}` is not a text file; specs and grids are YAML files like "
                        "`specs/resnet32.yaml`.") from None


def parse_spec(data: Any, source: str = "spec", default_name: str | None = None) -> Spec:
    """Validate a spec given as plain data (from YAML or a checkpoint).

    Args:
        data: the spec as a mapping (at least ``backbone:``).
        source: what to call it in error messages.
        default_name: the spec's name when ``data`` has none.

    Returns:
        The validated Spec.

    Raises:
        SpecError: an invalid field, named with the fix.
    """
    if not isinstance(data, dict):
        raise SpecError(
            f"`{source}` must hold a mapping with at least a `backbone:` section, "
            f"not {type(data).__name__}; see `dksgraph schema` for the format."
        )
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"`{source}` is not a valid spec: {describe_errors(exc, Spec)}. Fix the spec "
                        "(`dksgraph schema` prints every allowed field).") from None
    if spec.name is None and default_name:
        spec = spec.model_copy(update={"name": default_name})
    return spec


# The spec fields a command line or a grid may override, by the name of their flag. The recipe ones
# (all but the backbone's) decide a run's data and optimisation: a resumed run refuses to change them.
BACKBONE_OVERRIDES = ("num_classes", "input_size", "taps")
RECIPE_OVERRIDES = ("method", "dataset", "data_dir", "epochs", "batch_size", "lr", "warmup_epochs", "schedule",
                    "seed", "train_subset", "test_subset")


def apply_overrides(spec: Spec, source: str = "spec", **changes: Any) -> Spec:
    """The spec with overrides applied (a value of None keeps the spec's own) and validated again.

    Keys are :data:`BACKBONE_OVERRIDES` and :data:`RECIPE_OVERRIDES`. One rule for ``epochs``,
    wherever it comes from (`dksgraph train --epochs`, a grid): the multistep milestones and the
    step size scale with it, so a shortened run keeps the recipe's shape (200 epochs with
    milestones [60, 120, 160] become 20 epochs with [6, 12, 16]); warm-up epochs do not scale.

    >>> spec = parse_spec({"backbone": {"model": "zoo:resnet32"}})
    >>> short = apply_overrides(spec, epochs=20, lr=0.05)
    >>> short.train.epochs, short.train.schedule.milestones, short.train.optimizer.lr
    (20, [6, 12, 16], 0.05)
    """
    unknown = sorted(set(changes) - set(BACKBONE_OVERRIDES) - set(RECIPE_OVERRIDES))
    if unknown:
        raise TypeError(f"apply_overrides() got unknown overrides {unknown}")
    given = {k: v for k, v in changes.items() if v is not None}
    if not given:
        return spec
    data = spec.model_dump(mode="json")
    backbone, train = data["backbone"], data["train"]
    if "num_classes" in given:
        backbone["kwargs"] = {**backbone["kwargs"], "num_classes": given["num_classes"]}
    if "input_size" in given:
        backbone["input_size"] = list(given["input_size"])
    if "taps" in given:
        data["taps"] = given["taps"]
    for key in ("method", "dataset", "data_dir", "batch_size", "seed", "train_subset", "test_subset"):
        if key in given:
            train[key] = given[key]
    if "lr" in given:
        train["optimizer"]["lr"] = given["lr"]
    schedule = train["schedule"]
    if "warmup_epochs" in given:
        schedule["warmup_epochs"] = given["warmup_epochs"]
    if "schedule" in given:
        schedule["name"] = given["schedule"]
    epochs = given.get("epochs")
    if epochs is not None and epochs != train["epochs"]:
        scale = epochs / train["epochs"]
        schedule["milestones"] = sorted({max(1, round(m * scale)) for m in schedule["milestones"]})
        if schedule["step_size"] is not None:
            schedule["step_size"] = max(1, round(schedule["step_size"] * scale))
        train["epochs"] = epochs
    return parse_spec(data, source=source)


def describe_errors(exc: ValidationError, root: type[BaseModel]) -> str:
    """One readable sentence per problem of validating ``root``, with the allowed keys for an unknown one."""
    errors = exc.errors(include_url=False)
    cleaned = []
    for err in errors:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
        literal_branch = any(isinstance(p, str) and p.startswith("literal[") for p in err["loc"])
        cleaned.append((loc, literal_branch, err))
    has_structured = {loc[:1] for loc, lit, _ in cleaned if not lit}
    sentences = []
    for loc, literal_branch, err in cleaned:
        if literal_branch and loc[:1] in has_structured and len(cleaned) > 1:
            continue  # the input was a list; the error of the `auto`/keyword branch is noise
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(root, loc)
            hint = close_matches(str(loc[-1]), allowed)
            sentences.append(
                f"unknown key `{where}`"
                + (f" (did you mean {hint}?)" if hint else "")
                + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
            )
        elif err["type"] == "missing":
            sentences.append(f"`{where}` is required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            sentences.append(f"`{where}`: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(sentences))


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    model: type[BaseModel] | None = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found:
            return found
    return None
