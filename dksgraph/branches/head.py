"""The head of a branch: a fresh copy of everything the backbone runs after its final feature map.

:func:`build_head` copies the FX nodes between the final feature map f and the logits into a new
GraphModule, with fresh (re-initialised) copies of their modules; modules whose input channels
change with the branch's width are rebuilt at the new size (BatchNorm, Linear, LayerNorm, Conv2d).
For a pre-activation ResNet that is BN-ReLU-pool-flatten-Linear; for torchvision's ResNet,
pool-flatten-Linear.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn

from dksgraph.errors import GraphError
from dksgraph.fx.graph import Traced, final_linear
from dksgraph.fx.tracing import EVAL, attribute_at, in_mode

__all__ = ["build_head", "fresh_copy", "resized_norm"]


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every resettable parameter and running statistic re-initialised."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
    return clone



def build_head(traced: Traced, in_shape: tuple[int, ...]) -> fx.GraphModule:
    """A fresh copy of the backbone's head (everything after the final feature map), resized to ``in_shape``.

    The program returns ``(logits, feature)``: the feature is what enters the head's final ``nn.Linear`` (the
    pooled feature of a CNN, the class token of a ViT), None where the head has no Linear."""
    graph = traced.graphs[EVAL]
    head = set(traced.head)
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, object] = {}
    final = next(n for n in graph.nodes if n.meta["qualname"] == traced.final)
    env[final] = new.placeholder("x")
    output = next(n for n in graph.nodes if n.op == "output").args[0]
    result = output[0] if isinstance(output, (tuple, list)) else output
    for node in graph.nodes:
        if node.meta["qualname"] not in head:
            continue
        if node.op == "get_attr" or any(src not in env and src.op != "get_attr" for src in node.all_input_nodes):
            continue  # copied where used; or not fed by the final feature map (e.g. the input's shape)
        for src in node.all_input_nodes:
            if src not in env:  # a parameter or buffer the head reads directly: a copy of its own
                env[src] = new.get_attr(src.target)
                root[src.target] = copy.deepcopy(attribute_at(traced.model, src.target))
        env[node] = new.node_copy(node, lambda n: env[n])
        if node.op == "call_module":
            root[node.target] = traced.model.get_submodule(node.target)  # replaced by a resized copy below
        if node is result:
            linear = final_linear(graph, traced.model)
            new.output((env[node], env.get(linear.args[0]) if linear is not None else None))  # the logits, and what enters the final Linear (hints)
            program = fx.GraphModule(root, new, class_name="Head")
            _Resizer(program).run(torch.zeros((2, *in_shape)))
            return program
    raise GraphError("could not isolate the backbone's head after its final feature map; dksgraph needs the "
                     "classifier to be computed from the final feature map alone.")


def resized_norm(module: nn.BatchNorm1d | nn.BatchNorm2d | nn.LayerNorm, channels: int) -> nn.Module:
    """A fresh BatchNorm or LayerNorm like ``module`` over ``channels`` (a LayerNorm's last normalised dim)."""
    if isinstance(module, nn.LayerNorm):
        clone = copy.deepcopy(module)
        clone.normalized_shape = (*module.normalized_shape[:-1], channels)
        if module.elementwise_affine:
            clone.weight = nn.Parameter(torch.ones(clone.normalized_shape))
            clone.bias = nn.Parameter(torch.zeros(clone.normalized_shape)) if module.bias is not None else None
        return clone
    return type(module)(channels, module.eps, module.momentum, module.affine, module.track_running_stats)


class _Resizer(fx.Interpreter):
    """Runs a head once on a probe input and swaps each of its modules for a fresh copy sized to the input it
    receives, so that no parameter is shared with the backbone."""

    def call_module(self, target, args, kwargs):
        module = _resized(self.module.get_submodule(target), args[0], target)
        owner, _, name = target.rpartition(".")
        setattr(self.module.get_submodule(owner) if owner else self.module, name, module)
        with torch.no_grad(), in_mode(EVAL, module):
            return module(*args, **kwargs)

    def run_node(self, n: fx.Node):
        with torch.no_grad():
            return super().run_node(n)


def _resized(module: nn.Module, x: object, name: str) -> nn.Module:
    """A fresh copy of a head module, rebuilt where the input's channel count changed."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        return fresh_copy(module)
    channels = x.shape[1] if not isinstance(module, (nn.Linear, nn.LayerNorm)) else x.shape[-1]
    if isinstance(module, nn.LayerNorm) and x.dim() == 4 and x.shape[-1] != module.normalized_shape[-1]:
        channels = x.shape[1]  # a channels-first LayerNorm (torchvision's LayerNorm2d)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.num_features != channels:
        return resized_norm(module, channels)
    if isinstance(module, nn.Linear) and module.in_features != channels:
        return nn.Linear(channels, module.out_features, module.bias is not None)
    if isinstance(module, nn.LayerNorm) and module.normalized_shape[-1] != channels:
        return resized_norm(module, channels)
    if isinstance(module, nn.Conv2d) and module.in_channels != channels:
        if module.groups != 1:
            raise GraphError(f"the head's grouped convolution `{name}` cannot be resized to {channels} channels.")
        return nn.Conv2d(channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, 1, module.bias is not None, module.padding_mode)
    return fresh_copy(module)
