"""Deployment: :mod:`~dksgraph.deploy.strip` gives back the original network, verified bit for bit;
:mod:`~dksgraph.deploy.classifiers` cuts any classifier (or an ensemble) out as a standalone module;
:mod:`~dksgraph.deploy.exports` writes one as a verified file in a format of
:mod:`~dksgraph.deploy.formats` and reads it back; :mod:`~dksgraph.deploy.costs` measures what each
classifier costs."""

from dksgraph.deploy.classifiers import classifier
from dksgraph.deploy.exports import Exported, export, load_exported
from dksgraph.deploy.strip import BRANCHES, backbone_state, probe_input, strip, strip_checkpoint, verify

__all__ = ["BRANCHES", "Exported", "backbone_state", "classifier", "export", "load_exported", "probe_input", "strip",
           "strip_checkpoint", "verify"]
