"""dksgraph: Deeply-supervised Knowledge Synergy (Sun et al., CVPR 2019) as torch.fx graph surgery.

Example::

    >>> import dksgraph
    >>> spec = dksgraph.load_spec("specs/resnet32.yaml")        # doctest: +SKIP
    >>> model = dksgraph.augment(spec)                           # doctest: +SKIP
    >>> sorted(model(torch.randn(2, 3, 32, 32)))                 # doctest: +SKIP
    ['c2', 'c3', 'main']
"""

from dksgraph.errors import CheckpointError, DksError, GraphError, SpecError
from dksgraph.spec import Spec, load_spec

__version__ = "0.1.0"


def augment(spec, backbone=None):
    """Build the backbone of ``spec`` (or use ``backbone``) and return its AugmentedModel."""
    from dksgraph.augmented import augment as _augment

    return _augment(spec, backbone)


__all__ = ["CheckpointError", "DksError", "GraphError", "Spec", "SpecError", "augment", "load_spec"]
