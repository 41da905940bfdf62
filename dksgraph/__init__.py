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

``load_spec`` / ``parse_spec`` read a spec, ``augment`` builds the AugmentedModel, ``SynergyLoss`` is
the DKS objective, ``strip`` gives back the original network, ``export`` writes any classifier as a
verified file and ``load_exported`` reads it back, ``trace`` and
``valid_taps`` show where branches can go (what ``dksgraph inspect`` prints).
"""

from importlib import import_module

from dksgraph.errors import CheckpointError, DksError, GraphError, SpecError
from dksgraph.spec import Spec, load_spec, parse_spec

__version__ = "0.1.0"

_LAZY = {  # imported on first use, so that `import dksgraph` and the command line stay light
    "AugmentedModel": "dksgraph.augmented", "augment": "dksgraph.augmented",
    "SynergyLoss": "dksgraph.loss",
    "strip": "dksgraph.deploy", "export": "dksgraph.deploy", "load_exported": "dksgraph.formats",
    "trace": "dksgraph.graph", "valid_taps": "dksgraph.graph",
}

__all__ = ["AugmentedModel", "CheckpointError", "DksError", "GraphError", "Spec", "SpecError", "SynergyLoss",
           "augment", "export", "load_exported", "load_spec", "parse_spec", "strip", "trace", "valid_taps"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dksgraph' has no attribute '{name}'")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
