"""`fuse_`: replaces every Conv2d -> BatchNorm2d (-> ReLU/ReLU6/SiLU) chain of a user model by `ConvBNAct`.

The rewrite is an attribute swap, so the user's forward keeps running unchanged: the conv's attribute becomes
the `ConvBNAct` (which adopts the conv and BN modules, parameter objects included), the BN's attribute becomes
`nn.Identity`, and so does the activation's when it is a module called only there. A functional activation
(`F.relu(...)`) or a shared activation module (torchvision's BasicBlock calls one `self.relu` twice) stays
where it is and the op gets `act="none"`.

Chains are found with torch.fx: `conv -> bn -> act` as consecutive `call_module` nodes, each intermediate
value with exactly one user, each module called exactly once and registered under exactly one name. The model
is traced as it is, in train and in eval mode, since Python branches on `self.training` are baked into a
trace; a chain is taken only if each trace either has the same chain or never touches its modules.
A module fx cannot trace (data-dependent control flow, ...) is handled by its parts: each child is traced on
its own and a plain `nn.Sequential` is scanned for consecutive conv/bn/act children; a warning names the
module and the reason.

Not handled (left as they are): convs with `padding_mode != 'zeros'` or uneven 'same' padding, BN not
directly after the conv, a conv output used elsewhere, modules with hooks, subclasses of Conv2d/BatchNorm2d.
A forward that reads a plain attribute of a chain module besides calling it (`self.conv.out_channels`) is not
detected (fx bakes such values in); one that reads its tensors (`self.conv.weight`) is, and is left alone.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from kernels.activations import ACTIVATIONS
from kernels.conv_bn import ConvBNAct, SaveMode, _cpu_layout, _match_weight_layout, fold_conv_bn

logger = logging.getLogger(__name__)

_ACT_NAMES: dict[type[nn.Module], str] = {a.module: a.name for a in ACTIVATIONS.values() if a.module}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclass(frozen=True, slots=True)
class Chain:
    """One fusable chain, by qualified module name in the model."""

    conv: str
    bn: str
    act: str | None
    """The activation module absorbed into the op; None when there is none (or it must stay in place)."""

    def paths(self) -> tuple[str, ...]:
        return (self.conv, self.bn) if self.act is None else (self.conv, self.bn, self.act)


def fuse_(model: nn.Module, *, save: str | SaveMode = SaveMode.LEAN) -> nn.Module:
    """Replaces every fusable Conv2d -> BatchNorm2d (-> activation) chain in `model` by `ConvBNAct`, in place.

    Outputs, gradients and running statistics stay those of the original model in train and eval mode.
    `save` is the op's training memory mode ('lean' or 'fast'). Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    save = SaveMode.parse(save)
    chains = find_chains(model)
    for chain in chains:
        conv, bn = model.get_submodule(chain.conv), model.get_submodule(chain.bn)
        act = "none" if chain.act is None else _ACT_NAMES[type(model.get_submodule(chain.act))]
        conv.padding = _numeric_padding(conv)  # 'same'/'valid' resolved; ConvBNAct takes numbers only
        fused = ConvBNAct.from_modules(conv, bn, act=act, save=save)
        fused.train(bn.training)  # a BN frozen in eval() inside a training model stays frozen
        _set_submodule(model, chain.conv, fused)
        for path in chain.paths()[1:]:
            _set_submodule(model, path, nn.Identity())
    logger.info("fuse_: fused %d Conv2d->BatchNorm2d chains into ConvBNAct", len(chains))
    return model


def find_chains(model: nn.Module) -> list[Chain]:
    """The chains `fuse_` would fuse, in forward order. Changes nothing; warns when fx cannot trace a part."""
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    failures: list[tuple[str, str]] = []
    chains = _find(model, "", registered, failures)
    failed = [path for path, _ in failures]
    for path, reason in failures:
        # Only the innermost: its ancestors failed because they trace through it.
        if not any(other.startswith(f"{path}.") or (not path and other) for other in failed):
            warnings.warn(
                f"fuse_: torch.fx cannot trace {path or 'the model'!r} ({reason}); fused only the chains in "
                "its traceable submodules and plain nn.Sequential containers",
                stacklevel=3,
            )
    return chains


def _find(module: nn.Module, path: str, registered: Counter, failures: list[tuple[str, str]]) -> list[Chain]:
    if next(module.children(), None) is None or not _has_conv(module):
        return []
    try:
        graphs = [_trace(module, training) for training in (None, True, False)]
    except Exception as e:  # user forwards fail under tracing in arbitrary ways; all mean "not traceable"
        failures.append((path, f"{type(e).__name__}: {next(iter(str(e).splitlines()), '')}"))
    else:
        return _consistent_chains(module, path, graphs, registered)
    plain_sequential = type(module).forward is nn.Sequential.forward
    chains = _sequential_chains(module, path, registered) if plain_sequential else []
    taken = {p for c in chains for p in c.paths()}
    for name, child in module.named_children():
        child_path = _join(path, name)
        if child_path not in taken:
            chains += _find(child, child_path, registered, failures)
    return chains


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ConvBNAct) or super().is_leaf_module(m, module_qualified_name)


def _trace(module: nn.Module, training: bool | None) -> fx.Graph:
    """One fx graph of `module.forward`, with every `training` flag set to `training` (None: as they are).
    The flags are set directly: a user's `train()` override may have side effects beyond them."""
    flags = [(m, m.training) for m in module.modules()]
    try:
        for m, flag in flags:
            m.training = flag if training is None else training
        return _Tracer().trace(module)
    finally:
        for m, flag in flags:
            m.training = flag


def _consistent_chains(root: nn.Module, path: str, graphs: list[fx.Graph], registered: Counter) -> list[Chain]:
    found = [_graph_chains(root, path, g, registered) for g in graphs]
    out: dict[Chain, None] = {}
    for chains, _ in found:
        for chain in chains:
            if all(chain in other or used.isdisjoint(chain.paths()) for other, used in found):
                out[chain] = None
    return list(out)


def _graph_chains(root: nn.Module, path: str, graph: fx.Graph, registered: Counter) -> tuple[list[Chain], set[str]]:
    """(chains in one trace, qualified names of all modules the trace calls or reads attributes of)."""
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}  # owners of self.m.weight

    def module_of(node: fx.Node, kinds: tuple[type, ...]) -> nn.Module | None:
        """The module a one-argument call_module node calls, if of exactly one of `kinds` and swappable."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            return None
        m = root.get_submodule(node.target)
        ok = type(m) in kinds
        sole = calls[node.target] == 1 and node.target not in read and _swappable(m, registered)
        return m if ok and sole else None

    chains = []
    for node in graph.nodes:
        conv = module_of(node, (nn.Conv2d,))
        if conv is None or len(node.users) != 1:
            continue
        (bn_node,) = node.users
        bn = module_of(bn_node, (nn.BatchNorm2d,))
        if bn is None or bn_node.args[0] is not node or not _fusable(conv, bn):
            continue
        act = None
        if len(bn_node.users) == 1:
            (act_node,) = bn_node.users
            if module_of(act_node, tuple(_ACT_NAMES)) is not None and act_node.args[0] is bn_node:
                act = _join(path, act_node.target)
        chains.append(Chain(_join(path, node.target), _join(path, bn_node.target), act))
    used = {_join(path, t) for t in calls} | {_join(path, t) for t in read if t}
    return chains, used


def _sequential_chains(seq: nn.Module, path: str, registered: Counter) -> list[Chain]:
    children = list(seq.named_children())
    chains = []
    for i in range(len(children) - 1):
        (conv_name, conv), (bn_name, bn) = children[i], children[i + 1]
        if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or not _fusable(conv, bn):
            continue
        if not (_swappable(conv, registered) and _swappable(bn, registered)):
            continue
        act = None
        if i + 2 < len(children):
            act_name, act_module = children[i + 2]
            if type(act_module) in _ACT_NAMES and _swappable(act_module, registered):
                act = _join(path, act_name)
        chains.append(Chain(_join(path, conv_name), _join(path, bn_name), act))
    return chains


def _fusable(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    return conv.padding_mode == "zeros" and _numeric_padding(conv) is not None and bn.num_features == conv.out_channels


def _swappable(m: nn.Module, registered: Counter) -> bool:
    """Registered under one name (so one attribute swap replaces every way the model reaches it), no hooks."""
    return registered[id(m)] == 1 and not any(getattr(m, h, None) for h in _HOOKS)


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """conv.padding as numbers; None when 'same' needs uneven padding (F.conv2d pads one side more)."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding != "same":
        return tuple(conv.padding)
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return None
    return (total[0] // 2, total[1] // 2)


def _has_conv(module: nn.Module) -> bool:
    if isinstance(module, ConvBNAct):
        return False
    return type(module) is nn.Conv2d or any(_has_conv(c) for c in module.children())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent), name, module)


class FoldedConvAct(nn.Module):
    """Inference form of one `ConvBNAct`: a conv whose weight and bias have the BN folded in (frozen, no grad),
    then the activation, in place on the conv's own output. On CPU the weight and the activations are
    channels_last (oneDNN's native layout). What `inference_module` puts in place of each ConvBNAct."""

    def __init__(self, op: ConvBNAct):
        super().__init__()
        with torch.no_grad():
            w, b = fold_conv_bn(*op._fold_args())
        w = w.detach().clone()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        conv = op.conv
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.act = op.act

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, act={self.act.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = _cpu_layout(x, self.weight)
        if not torch.compiler.is_compiling():
            _match_weight_layout(self.weight, x)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return self.act.forward(y)
        return self.act.forward_(y)  # y is ours and no graph records it


def inference_module(model: nn.Module, *, compile: bool = False) -> nn.Module:
    """The inference form of `model` (left unchanged): a deep copy in eval mode with every fusable
    Conv2d -> BatchNorm2d (-> act) chain fused and every `ConvBNAct` replaced by its BN-folded `FoldedConvAct`
    (channels_last on CPU), parameters frozen (requires_grad=False).

    `compile=True` returns that copy as a `CompiledInference` (inductor, dynamic batch): the
    form Serve runs fp32 artifacts through and the sweep times (models.quantize.compiled_for_inference), the
    one bench/train_throughput's whole_model_infer_ratio measures. The returned module's outputs equal
    `model.eval()(x)` (float rounding aside)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    m = copy.deepcopy(model).eval()
    fuse_(m)
    for name, op in list(m.named_modules()):
        if isinstance(op, ConvBNAct) and op.bn.track_running_stats:
            if name:  # the root itself is handled below
                _set_submodule(m, name, FoldedConvAct(op))
    if isinstance(m, ConvBNAct) and m.bn.track_running_stats:
        m = FoldedConvAct(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return CompiledInference(m) if compile else m


def fastest_inference_module(
    model: nn.Module, example: torch.Tensor, batch_sizes: Iterable[int] = (1, 32), iters: int = 5
) -> tuple[nn.Module, dict[str, float]]:
    """The faster of `model`'s two inference forms on this machine and input shape: `inference_module(model)`
    (BN folded, eager) or the same copy compiled (`CompiledInference`). Neither wins everywhere: compiled measured
    0.81 of eager NCHW on `small` 8x8 but 1.83 on resnet18 8x8, whose 1x1 late maps inductor handles badly
    (bench/results/train_throughput.json), so the form is chosen by timing both, as the measurements say.
    Serve's fp32 replicas and the sweep's latency (models.quantize.compiled_for_inference) both call this,
    so the served form is the measured one. `example` (N >= 1, C, H, W) gives the input shape; the score is
    the sum over `batch_sizes` of each form's median of `iters` calls, after the compiles (`warmup`).
    Returns (module, {"eager_s", "compiled_s", "compile_s"})."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[0] < 1:
        raise ValueError(f"example must be a (N >= 1, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {list(sizes)}")
    plain = inference_module(model)
    compiled = CompiledInference(plain)
    compile_s = sum(compiled.warmup(example, sizes).values())

    def score(fn: nn.Module) -> float:
        total = 0.0
        with torch.inference_mode():
            for b in sizes:
                x = example[:1].expand(b, *example.shape[1:]).contiguous()
                fn(x)  # first call after a switch of form: caches, allocator
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - t0)
                total += sorted(times)[len(times) // 2]
        return total

    eager_s, compiled_s = score(plain), score(compiled)
    logger.info("inference form: eager %.2f ms, compiled %.2f ms (sum over batch sizes %s): %s", eager_s * 1e3,
                compiled_s * 1e3, sizes, "compiled" if compiled_s < eager_s else "eager")  # fmt: skip
    timings = {"eager_s": eager_s, "compiled_s": compiled_s, "compile_s": compile_s}
    return (compiled if compiled_s < eager_s else plain), timings


class CompiledInference(nn.Module):
    """`folded` (an `inference_module` copy) compiled by inductor with a dynamic batch dimension, called under
    inference_mode.

    Freezing through `torch.compile(options=)` only: with it the weights stay graph inputs (dynamo lifts module
    parameters), so a second model of the same class (a Serve hot update) reuses the graphs without a compile,
    with its own weights. Freezing switched on around the calls (inductor's config, as models.quantize's
    BucketCompiled must for int8) makes them constants that oneDNN pre-packs: measured here 1.7x eager at batch 1
    on 8x8 maps (its blocked layouts are slow on small maps) against 0.75 this way, and each model then takes
    three of dynamo's eight graphs per code object. (resnet18 32x32 batch 32: 0.88 frozen, 0.90 this way.)

    Why dynamic rather than one static graph per power-of-two bucket (`models.quantize.BucketCompiled`, which
    int8 needs for its pre-packing): on fp32 it measured as fast (resnet18 32x32: 0.83 / 0.97 of eager at
    batch 1 / 32, static 0.82 / 0.96), pads nothing, and compiles three graphs instead of one per bucket:
    batch 1 (specialized), batches 2-15 and batches >= 16 (the conv's output layout changes at batch 16 there).
    A compile costs seconds to tens of seconds on 2 cores; `warmup` does them ahead and says how long each took.
    """

    def __init__(self, folded: nn.Module):
        super().__init__()
        if not isinstance(folded, nn.Module):
            raise TypeError(f"folded must be an nn.Module, got {type(folded).__name__}")
        self.folded = folded
        # not registered as a submodule: its parameters are `folded`'s, and state_dict() must list them once
        self.__dict__["_compiled"] = torch.compile(folded, dynamic=True, options={"freezing": True})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of `x`, as an inference tensor (no autograd; read it, do not modify it in place)."""
        with torch.inference_mode():
            if not x.is_inference():
                # dynamo guards an input's dispatch keys: a normal tensor and an inference tensor would each get
                # their own compile; the copy of one input costs microseconds
                x = x.clone()
            return self._compiled(x)

    def warmup(self, example: torch.Tensor, batch_sizes: Iterable[int]) -> dict[int, float]:
        """Calls the model once per size in `batch_sizes` on copies of the first row of `example` (N >= 1, ...)
        so that the compiles happen now; returns {batch size: seconds that first call took}."""
        if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
            raise ValueError(f"example must be a tensor with at least one row, got {example!r:.80}")
        seconds = {}
        with torch.inference_mode():
            for b in batch_sizes:
                if not isinstance(b, int) or b < 1:
                    raise ValueError(f"batch sizes must be positive ints, got {b!r}")
                x = example[:1].expand(b, *example.shape[1:]).contiguous()
                t0 = time.perf_counter()
                self(x)
                seconds[b] = time.perf_counter() - t0
                logger.info("CompiledInference: batch %d ready in %.1f s", b, seconds[b])
        return seconds
