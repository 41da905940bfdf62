"""torch.fx tracing with torchvision-style node names, and shape propagation.

The tracer names nodes like ``torchvision.models.feature_extraction.get_graph_node_names``: a
module call is named by its path (``layer1.0.conv1``), any other op by its enclosing module's path
plus the op (``layer1.0.add``), with ``_1``, ``_2``... for repeats. :mod:`dksgraph.fx.graph` builds
its topology analysis on these.

When timm is loaded, the modules and functions timm registers as not traceable
(``timm.layers.get_notrace_modules`` / ``get_notrace_functions``) are traced as single nodes, so
that the models timm's own FX feature extraction handles trace here too.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from dksgraph.errors import GraphError, first_line

__all__ = ["CONSTANTS", "EVAL", "MODES", "TRAIN", "attribute_at", "check_resolution", "copy_view", "graph_module",
           "in_mode", "mode_of", "move_constants", "propagate_shapes", "stride_of", "trace_graph", "view_program"]

EVAL, TRAIN = False, True  # the keys of a Traced's graphs and of every program built from them: module.training
MODES = (EVAL, TRAIN)


def mode_of(module: nn.Module) -> bool:
    """The key of the graph or program that runs ``module`` in its current mode (EVAL or TRAIN)."""
    return TRAIN if module.training else EVAL


class _PathTracer(fx.Tracer):
    """An FX tracer that records a torchvision-style qualified name for every node."""

    def __init__(self, leaf_modules: list[str]) -> None:
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_modules=(math,), autowrap_functions=functions)
        self.leaf_types = leaf_types
        self.leaf_modules = set(leaf_modules)
        self._path = ""
        self.failure_scope: str | None = None
        self.qualnames: dict[fx.Node, str] = {}
        self._seen: Counter[str] = Counter()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_modules or type(m).__name__ in self.leaf_modules:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name) or _subclasses_a_torch_op(m)

    def call_module(self, m, forward, args, kwargs):
        outer, self._path = self._path, self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failure_scope is None:
                self.failure_scope = self._path
            raise
        finally:
            self._path = outer

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "call_module":
            base = str(target)
        else:
            op = re.sub(r"_\d+$", "", node.name)
            base = f"{self._path}.{op}" if self._path else op
        count = self._seen[base]
        self._seen[base] += 1
        self.qualnames[node] = base if count == 0 else f"{base}_{count}"
        node.meta["qualname"] = self.qualnames[node]
        return node


@contextmanager
def in_mode(training: bool, *modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in train or eval mode for the block, then restore every submodule's own flag."""
    modes = {m: m.training for module in modules for m in module.modules()}
    for module in modules:
        module.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def stride_of(m: nn.Module) -> int:
    """A layer's largest stride (1 for layers without one)."""
    stride = getattr(m, "stride", 1) or 1
    return max(stride) if isinstance(stride, tuple) else int(stride)


def _timm_notrace() -> tuple[tuple[type, ...], tuple]:
    """timm's registered leaf modules and autowrapped functions, if timm has been imported."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # a timm too old to have them
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


def _subclasses_a_torch_op(m: nn.Module) -> bool:
    """A childless subclass of a built-in layer (torchvision's LayerNorm2d, say) is an op, not a block."""
    if list(m.children()):
        return False
    return any(base.__module__.startswith("torch.nn.modules") and base not in (nn.Module, nn.Sequential,
               nn.ModuleList, nn.ModuleDict) for base in type(m).__mro__[1:])


CONSTANTS = "_dksgraph_constants"  # where a traced graph keeps the tensors FX found in the forward code


def trace_graph(model: nn.Module, leaf_modules: list[str], training: bool) -> fx.Graph:
    """Trace ``model`` in train or eval mode; every node gets ``meta["qualname"]``.

    The model is left as it was: its modes are restored, and the tensor constants FX's tracer sets on
    the traced module (``_tensor_constant0``, ...) are moved onto the graph (see :func:`graph_module`).
    """
    tracer = _PathTracer(leaf_modules)
    before = set(model.__dict__)
    try:
        with in_mode(training, model):
            graph = tracer.trace(model)
    except Exception as exc:
        scope = tracer.failure_scope or ""
        where = f"module `{scope}` ({type(model.get_submodule(scope)).__name__})" if scope else "the top-level forward"
        leaf = type(model.get_submodule(scope)).__name__ if scope else None
        first = first_line(exc, empty=type(exc).__name__)
        raise GraphError(
            f"torch.fx cannot trace {type(model).__name__}: {where} failed with \"{first}\". FX cannot follow "
            "Python control flow that depends on tensor values. "
            + (f"Trace it as one node by adding `{leaf}` (or its path `{scope}`) to `backbone.leaf_modules` "
               "in the spec, provided it sits inside a block and not on a tap." if leaf else
               "Add the offending submodule's class name to `backbone.leaf_modules` in the spec.")
        ) from None
    finally:
        added = {name: model.__dict__.pop(name) for name in set(model.__dict__) - before}
    setattr(graph, CONSTANTS, added)
    return graph


def graph_module(model: nn.Module, graph: fx.Graph, class_name: str = "GraphModule",
                 constants: dict | None = None) -> fx.GraphModule:
    """``graph`` as a GraphModule over ``model``'s own submodules and attributes, plus the tensor constants
    found while tracing it (``constants``, default: the graph's own)."""
    constants = getattr(graph, CONSTANTS, {}) if constants is None else constants
    root = {}
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            root[n.target] = constants[n.target] if n.target in constants else attribute_at(model, n.target)
    return fx.GraphModule(root, graph, class_name)


def view_program(root: nn.Module, graph: fx.Graph, class_name: str, constants: dict) -> fx.GraphModule:
    """``graph`` as a GraphModule that is a view, not a copy, of ``root``'s module tree.

    The program looks its submodules, parameters and buffers up in ``root``'s own tables at every
    call, so a module swapped into ``root`` later (SyncBatchNorm's ``convert_sync_batchnorm``, a
    user's replacement, ``.to()``) is the one that runs; only the tensor ``constants`` FX found in
    the forward code are the program's own (see :func:`move_constants`).
    """
    program = graph_module(root, graph, class_name, constants)
    own = {name: getattr(program, name) for name in constants}
    program.__dict__.update(_modules=root._modules, _parameters=root._parameters, _buffers=root._buffers,
                            _constants=tuple(own), **own)
    return program


def move_constants(program: fx.GraphModule, fn) -> None:
    """Apply a module's ``_apply`` function (``.to()``, ``.half()``) to a view program's own constants."""
    for name in program.__dict__["_constants"]:
        program.__dict__[name] = fn(program.__dict__[name])


def copy_view(program: fx.GraphModule, root: nn.Module, memo: dict) -> fx.GraphModule:
    """A :func:`view_program` like ``program`` over ``root`` (a deep copy of its root), for ``__deepcopy__``."""
    constants = {name: copy.deepcopy(program.__dict__[name], memo) for name in program.__dict__["_constants"]}
    return view_program(root, program.graph, type(program).__name__, constants)


def attribute_at(model: nn.Module, path: str):
    """The attribute a dotted path names (``layer1.0.conv1``, ``fc.weight``)."""
    owner, _, name = path.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, qual: dict[fx.Node, str]) -> None:
        super().__init__(gm)
        self.qual = qual
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.failed: fx.Node | None = None

    def run_node(self, n: fx.Node):
        try:
            out = super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise
        if isinstance(out, torch.Tensor):
            self.shapes[self.qual[n]] = tuple(out.shape[1:])
        return out


def propagate_shapes(model, graph, qual, input_size) -> dict[str, tuple[int, ...]]:
    """Per-node output shape (without the batch dimension) for one input of ``input_size``, in eval mode.

    An exception raised by the backbone's own code (a shape assertion in an attention module, a kernel
    larger than its input) becomes a GraphError naming the module, its input shape and the likely fix.
    """
    gm = graph_module(model, graph)
    recorder = _ShapeRecorder(gm, qual)
    param = next(model.parameters(), None)
    x = torch.zeros((1, *input_size), dtype=param.dtype if param is not None else torch.float32,
                    device=param.device if param is not None else "cpu")
    try:
        with torch.inference_mode(), in_mode(EVAL, model):
            recorder.run(x)
    except Exception as exc:
        node = recorder.failed
        where = "the forward"
        if node is not None:
            inputs = [recorder.shapes.get(recorder.qual[a]) for a in node.all_input_nodes]
            shown = ", ".join("x".join(map(str, s)) for s in inputs if s)
            kind = f" ({type(model.get_submodule(node.target)).__name__})" if node.op == "call_module" else ""
            where = f"`{recorder.qual[node]}`{kind}" + (f" on input {shown}" if shown else "")
        msg = first_line(exc, empty=type(exc).__name__).rstrip(".")
        raise GraphError(
            f"running {type(model).__name__} at input_size {list(input_size)} failed in {where}: "
            f"{type(exc).__name__}: {msg}. If the input does not suit the network (too small for its downsampling, "
            "or not the fixed size it was built for), set `backbone.input_size` to its size (e.g. [3, 224, 224] "
            "for ImageNet models, the size in `backbone.kwargs` for fixed-size ones); if the module's code cannot "
            "run on the traced graph, add it to `backbone.leaf_modules`."
        ) from None
    return recorder.shapes


def check_resolution(model, graph, qual, shapes) -> None:
    """Refuse an input so small that strided layers run on a 1x1 map (downsampling counts would lie)."""
    for n in graph.nodes:
        if n.op != "call_module" or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        stride = stride_of(model.get_submodule(n.target))
        s_in = shapes.get(qual[n.args[0]], ())
        if stride > 1 and len(s_in) == 3 and s_in[1] == 1 and s_in[2] == 1:
            raise GraphError(
                f"input_size is too small for this network's downsampling: the strided layer `{qual[n]}` "
                f"receives a 1x1 feature map, so later stages cannot halve it. Raise `backbone.input_size` "
                "(e.g. [3, 224, 224] for ImageNet models, [3, 32, 32] for the CIFAR zoo)."
            )
