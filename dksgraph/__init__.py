"""dksgraph: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019) as torch.fx graph surgery.

The package-level API, importable and callable in any order::

    >>> import torch, dksgraph
    >>> spec = dksgraph.parse_spec({"backbone": {"model": "zoo:resnet32", "input_size": [3, 32, 32]}})
    >>> model = dksgraph.augment(spec)
    >>> logits = model(torch.randn(2, 3, 32, 32))
    >>> list(logits)
    ['main', 'c2', 'c3']
    >>> out = dksgraph.SynergyLoss.for_model(model)(logits, torch.zeros(2, dtype=torch.long))
    >>> original = dksgraph.strip(model)                     # the plain ResNet-32, verified
    >>> "layer2" in dksgraph.valid_taps(original, (3, 32, 32))
    True

``load_spec`` / ``parse_spec`` read a spec, ``augment`` builds the AugmentedModel, ``load`` gives back the
trained AugmentedModel of any dksgraph checkpoint, ``SynergyLoss`` is the DKS objective, ``strip`` gives back
the original network, ``export`` writes any classifier as a verified file and ``load_exported`` reads it
back, ``trace`` and ``valid_taps`` show where branches can go (what ``dksgraph inspect`` prints).

The package reads in the order its stages run (:data:`LAYERS`, bottom to top): a spec is read, the backbone
traced (``fx``), branches planned and built (``branches``), the AugmentedModel put together and trained with
the synergy loss (``augmented``, ``loss``, ``train``), and the branches stripped or any classifier exported
(``deploy``); ``experiments`` runs grids of training runs. A module imports only from its own layer and the
layers below it (``tests/test_package.py`` holds the package to this table).
"""

from importlib import import_module

from dksgraph.errors import CheckpointError, DksError, GraphError, SpecError
from dksgraph.spec import Spec, load_spec, parse_spec

__version__ = "0.1.0"

LAYERS: tuple[tuple[str, ...], ...] = (  # bottom to top; a module may import from its layer and those below
    ("errors", "names", "formatting"),  # leaves: error types, the names of files and keys, text tables
    ("spec",),  # the YAML spec, validated
    ("objective",),  # methods as presets over the objective's terms, expanded
    ("integrity", "checkpoint"),  # seals written and verified; atomic writes, dksgraph/1 checkpoints, safe reads
    ("models",),  # the model zoo and backbone factories (timm, torchvision, pretrained weights)
    ("fx",),  # tracing, blocks and stages, downsampling counts and taps
    ("branches",),  # plan, then build, the auxiliary classifiers
    ("loss", "augmented"),  # the synergy loss; the backbone with its branches
    ("summary", "render"),  # tables and pictures of an AugmentedModel
    ("deploy",),  # strip, standalone classifiers, export formats, costs
    ("train",),  # the training loop, data, DDP, the train and eval commands
    ("experiments",),  # grids of runs and their reports
    ("cli", "__main__", "__init__"),  # the command line and the package API
)

_LAZY = {  # imported on first use, so that `import dksgraph` and the command line stay light
    "AugmentedModel": "dksgraph.augmented", "augment": "dksgraph.augmented", "load": "dksgraph.augmented",
    "SynergyLoss": "dksgraph.loss",
    "strip": "dksgraph.deploy.strip", "export": "dksgraph.deploy.exports", "load_exported": "dksgraph.deploy.exports",
    "trace": "dksgraph.fx.graph", "valid_taps": "dksgraph.fx.graph",
}

__all__ = ["LAYERS", "AugmentedModel", "CheckpointError", "DksError", "GraphError", "Spec", "SpecError",
           "SynergyLoss", "augment", "export", "load", "load_exported", "load_spec", "parse_spec", "strip", "trace",
           "valid_taps"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dksgraph' has no attribute '{name}'")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
