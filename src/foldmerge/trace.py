"""A merge spec derived by tracing (torch.fx), for models built of a few parts that merge safely.

`traced_spec(name, backbone)` walks the backbone's fx graph and gives every tensor a space:

  the input                          a shared space ("input"); flatten / reshape / view of it stay shared
  nn.Linear                          a new space for its output (one per module, however often called);
                                     the weight reads its input's space (shared: no U) and writes it
  nn.LayerNorm over the last axis    keeps its input's space; its weight and bias are a Norm of it
  elementwise activations, dropout   keep the space (relu, gelu, silu, tanh, sigmoid, leaky_relu, elu,
                                     softplus as modules, functions or methods; identity, dropout)
  a + b of two tensors               a residual add: a and b are one space (unified)
  a + c, a * c, a / c, a - c         with c a Python number: keeps the space
  the output                         one tensor, not the shared input: the spec's output space

Every Linear reading a tensor gets that tensor's U (linears reading one tensor share it, as
Q, K and V do). A space is observed (probed) at every tensor a Linear or LayerNorm reads, but
a LayerNorm's output (its input, normalized, is observed already), and at the backbone's output. Anything else is refused with an error naming the node, never merged
silently wrong: attention and any matmul, convolutions, embeddings, concatenation, reshapes
of merged tensors, products of two tensors, parameters used outside nn.Linear / nn.LayerNorm,
control flow that torch.fx cannot trace.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.nn import functional as F

from .arch import register_arch
from .spec import ArchSpec, Norm, Param, Probe, Space


class TraceError(ValueError):
    """The tracer cannot describe this model; the message names the node and says why."""


ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus,
                      nn.Identity, nn.Dropout)
ACTIVATION_FUNCTIONS = {F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.leaky_relu, F.elu, F.softplus, F.dropout,
                        torch.relu, torch.tanh, torch.sigmoid}
ACTIVATION_METHODS = {"relu", "tanh", "sigmoid"}
SHAPE_METHODS = {"flatten", "reshape", "view"}
SHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
ADDS = {operator.add, torch.add}
SCALARS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
SCALAR_METHODS = {"add", "sub", "mul", "div"}
SHARED = "input"


def _refuse(name: str, node, why: str):
    raise TraceError(f"cannot trace a merge spec for {name!r}: node {node.name!r} ({node.op} {_target(node)}) "
                     f"{why}; write its spec by hand (docs/own-model.md)")


def _target(node) -> str:
    t = node.target
    return getattr(t, "__name__", None) or str(t)


def traced_spec(name: str, backbone: nn.Module, build=None, resize=None, defaults: str = "vit") -> ArchSpec:
    """The merge spec of `backbone` read from its fx graph (module docstring); `build(config)` and
    `resize(config, widths)` are the spec's (resize may be None: then `--widths` is refused);
    `defaults`: the row of `foldmerge.arch.defaults` its merges default to ("mlp" for a chain of
    layers trained as the paper's MLPs)."""
    try:
        graph = fx.symbolic_trace(backbone).graph
    except Exception as e:          # fx raises many kinds for code it cannot follow
        raise TraceError(f"cannot trace a merge spec for {name!r}: torch.fx cannot trace it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); write its spec by hand "
                         "(docs/own-model.md)") from None
    modules = dict(backbone.named_modules())
    parent: dict[str, str] = {}                  # union-find over space ids

    def find(s):
        while parent[s] != s:
            parent[s] = parent[parent[s]]
            s = parent[s]
        return s

    def new_space(label):
        parent[label] = label
        return label

    value: dict = {}                             # node -> space id (SHARED for the input), None: not a tensor
    linear_out: dict[str, str] = {}              # module -> the space it writes
    linear_in: dict[str, tuple] = {}             # module -> (space it reads, node it reads)
    norms: dict[str, str] = {}                   # module -> space
    reads: list[tuple] = []                      # (module, node read) in graph order
    new_space(SHARED)
    placeholders = 0
    output = None
    for node in graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        ins = [value.get(a) for a in args]
        if node.op == "placeholder":
            placeholders += 1
            if placeholders > 1:
                _refuse(name, node, "is a second input; the tracer takes models of one input")
            value[node] = SHARED
        elif node.op == "get_attr":
            _refuse(name, node, "reads a parameter or buffer outside nn.Linear / nn.LayerNorm")
        elif node.op == "call_module":
            mod = modules[node.target]
            if len(args) != 1 or ins[0] is None:
                _refuse(name, node, "takes other than one tensor")
            src = ins[0]
            if isinstance(mod, nn.Linear):
                out = linear_out.get(node.target) or new_space(node.target)
                linear_out[node.target] = out
                if node.target in linear_in:        # called again: it reads one space throughout
                    _union(find, parent, linear_in[node.target][0], src, name, node)
                else:
                    linear_in[node.target] = (src, args[0])
                if find(src) != SHARED:
                    reads.append((node.target, args[0]))
                value[node] = out
            elif isinstance(mod, nn.LayerNorm):
                if find(src) == SHARED:
                    _refuse(name, node, "normalizes the shared input, which is never merged")
                if len(mod.normalized_shape) != 1:
                    _refuse(name, node, "normalizes over more than the last axis")
                norms[node.target] = src
                reads.append((node.target, args[0]))
                value[node] = src
            elif isinstance(mod, ACTIVATION_MODULES):
                value[node] = src
            else:
                _refuse(name, node, f"is a {type(mod).__name__}, not a Linear, LayerNorm or elementwise activation")
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if node.op == "call_method" and fn in ("size", "dim"):
                value[node] = None
            elif (fn in SHAPE_FUNCTIONS or fn in SHAPE_METHODS) and ins and ins[0] is not None:
                if find(ins[0]) != SHARED:
                    _refuse(name, node, "reshapes a merged tensor (its features would mix with other axes)")
                value[node] = SHARED
            elif fn in ACTIVATION_FUNCTIONS or (node.op == "call_method" and fn in ACTIVATION_METHODS):
                if len(args) != 1 or ins[0] is None:
                    _refuse(name, node, "takes other than one tensor")
                value[node] = ins[0]
            elif (fn in ADDS or (node.op == "call_method" and fn == "add")) and len(args) == 2:
                a, b = ins
                if a is None or b is None:
                    _refuse(name, node, "adds a value that is not a tensor the tracer follows")
                if SHARED in (find(a), find(b)):
                    _refuse(name, node, "adds the shared input to a merged tensor")
                value[node] = _union(find, parent, a, b, name, node)
            elif (fn in SCALARS or (node.op == "call_method" and fn in SCALAR_METHODS)) and len(args) == 1 \
                    and len(numbers) == 1 and len(node.args) == 2 and ins[0] is not None:
                value[node] = ins[0]
            else:
                _refuse(name, node, "is not a Linear, LayerNorm, elementwise activation, residual add or "
                                    "scaling by a number")
        elif node.op == "output":
            out_args = [a for a in node.args if isinstance(a, fx.Node)]
            if len(node.args) != 1 or len(out_args) != 1 or value.get(out_args[0]) is None:
                _refuse(name, node, "returns other than one tensor")
            output = out_args[0]
            if find(value[output]) == SHARED:
                _refuse(name, node, "returns the shared input itself")
    # name every space after the first Linear writing it
    label: dict[str, str] = {SHARED: SHARED}
    for mod, s in linear_out.items():
        label.setdefault(find(s), mod)
    spaces = [Space(SHARED, shared=True)] + [Space(v) for k, v in label.items() if k != SHARED]

    def space_of(s):
        return label[find(s)]

    params, probes, probed = [], [], set()
    for mod, out in linear_out.items():
        src, read = linear_in[mod]
        m = modules[mod]
        shared = find(src) == SHARED
        params.append(Param(f"{mod}.weight", (space_of(out), space_of(src)),
                            unmerge_at=None if shared else read.name))
        if m.bias is not None:
            params.append(Param(f"{mod}.bias", (space_of(out),)))
    normalized = {n.name for n in graph.nodes if n.op == "call_module" and n.target in norms}
    for mod, read in reads:            # a LayerNorm's output is its input normalized: observed at the input
        if read.name not in probed and read.name not in normalized:
            probed.add(read.name)
            probes.append(Probe(space_of(value[read]), mod, "in"))
    probes.append(Probe(space_of(value[output]), "", "out"))
    norm_list = [Norm(mod, space_of(s)) for mod, s in norms.items() if modules[mod].elementwise_affine]
    widths = tuple(sp.name for sp in spaces if not sp.shared)

    def no_resize(config, w):
        raise ValueError(f"the traced spec of {name!r} has no resize; register it with resize= to merge to "
                         "other widths")

    return ArchSpec(name, spaces, params, norm_list, probes, output=space_of(value[output]), build=build,
                    resize=resize or no_resize, width_spaces=widths, defaults=defaults,
                    relu_layers=tuple((mod, space_of(linear_out[mod])) for mod in _relu_chain(graph, modules)))


def _relu_chain(graph, modules) -> tuple[str, ...]:
    """The Linear modules, in order, of a graph that is x -> (reshapes) -> [Linear -> ReLU] x L
    with the last ReLU returned; () for any other graph."""
    layers, last, want_linear = [], None, True
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
            continue
        if n.op == "output":
            return tuple(layers) if layers and want_linear and n.args[0] is last else ()
        if [a for a in n.args if isinstance(a, fx.Node)] != [last]:
            return ()
        linear = n.op == "call_module" and isinstance(modules[n.target], nn.Linear)
        relu = (n.op == "call_module" and isinstance(modules[n.target], nn.ReLU)) or \
            (n.op == "call_function" and n.target in (F.relu, torch.relu)) or (n.op == "call_method" and n.target == "relu")
        shape = n.target in SHAPE_FUNCTIONS or (n.op == "call_method" and n.target in SHAPE_METHODS)
        if shape and not layers:
            pass
        elif want_linear and linear and n.target not in layers:
            layers.append(n.target)
            want_linear = False
        elif not want_linear and relu:
            want_linear = True
        else:
            return ()
        last = n
    return ()


def _union(find, parent, a, b, name, node):
    ra, rb = find(a), find(b)
    if SHARED in (ra, rb) and ra != rb:
        _refuse(name, node, "joins the shared input with a merged tensor")
    if ra != rb:
        parent[rb] = ra
    return ra


def register_traced(name: str, build, resize=None, defaults: str = "vit") -> None:
    """`register_arch(name, …)` with the spec traced from `build(config)` for each configuration."""

    def spec(config):
        return traced_spec(name, build(config), build=build, resize=resize, defaults=defaults)
    register_arch(name, spec)
