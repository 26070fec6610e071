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
import operator
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from kernels.activations import ACTIVATIONS, get_activation
from kernels.conv_bn import _CL_MIN_PIXELS, ConvBNAct, SaveMode, _cpu_layout, _match_weight_layout, fold_conv_bn
from kernels.winograd import TILES as WINOGRAD_TILES
from kernels.winograd import winograd_conv3x3, winograd_weight

logger = logging.getLogger(__name__)

_ACT_NAMES: dict[type[nn.Module], str] = {a.module: a.name for a in ACTIVATIONS.values() if a.module}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
FX_TRACE_LOCK = threading.RLock()
"""Held around this module's torch.fx traces; take it around any forward that may run beside them (the serving
replica's, serve_app/replica.py). fx's tracer patches nn.Module.__call__ and __getattr__ process-wide while it
traces, so a model run in another thread meanwhile went through the tracer and failed ("module is not installed as
a submodule": 2668 of 2675 calls in a two-thread check while a hot update traced the oneDNN form)."""


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
        with FX_TRACE_LOCK:
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


def first_row_batch(example: torch.Tensor, n: int) -> torch.Tensor:
    """A contiguous batch of `n` copies of `example`'s first row: what the forms are timed, planned and warmed on."""
    return example[:1].expand(n, *example.shape[1:]).contiguous()


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
    """The fastest of `model`'s inference forms on this machine and input shape: `inference_module(model)`
    (BN folded, eager), the same copy compiled (`CompiledInference`), the oneDNN form (`OneDNNInference`:
    per conv + act (+ residual add) a fused oneDNN primitive, F.conv2d or Winograd, whichever timed fastest,
    planned per batch size), or the same copy traced and frozen (`ScriptedInference`: one GIL hand-off per call,
    which is what a forward beside busy event loops waits on). None wins everywhere:
    compiled measured 0.81 of eager NCHW on `small` 8x8 but 1.83 on resnet18 8x8, whose 1x1 late maps inductor
    handles badly (bench/results/train_throughput.json), so the form is chosen by timing them all, as the
    measurements say. Serve's fp32 replicas and the sweep's latency (models.quantize.compiled_for_inference)
    both call this, so the served form is the measured one. `example` (N >= 1, C, H, W) gives the input shape;
    the score is the sum over `batch_sizes` of each form's median of `iters` calls (thread CPU time at one torch
    thread, else wall time), after the compiles (`warmup`). The oneDNN form is left out where this PyTorch lacks
    its ops or the input is not CPU float32, the traced one where tracing cannot follow the model.
    Returns (module, {"eager_s", "compiled_s", "onednn_s", "scripted_s" (when timed), "compile_s"})."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[0] < 1:
        raise ValueError(f"example must be a (N >= 1, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    sizes = tuple(batch_sizes)
    if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {list(sizes)}")
    plain = inference_module(model)
    compiled = CompiledInference(plain)
    compile_s = sum(compiled.warmup(example, sizes).values())
    forms: dict[str, nn.Module] = {"eager_s": plain, "compiled_s": compiled}
    if onednn_available() and example.device.type == "cpu" and example.dtype == torch.float32:
        forms["onednn_s"] = OneDNNInference(model, example, sizes)
    try:
        forms["scripted_s"] = ScriptedInference(plain, example)
    except ValueError as e:  # data-dependent control flow, an op TorchScript cannot trace: the other forms
        logger.info("no traced form: %s", e)

    # One torch thread: this thread's CPU time, which a loaded machine does not inflate (by wall time, small
    # 32x32's forms scored compiled 18.5-35.7 ms and oneDNN 8.9-15.3 in three scorings at load 4, a swing that
    # can choose the form 0.98 of eager at batch 1 over the one 0.75); more threads work beyond this one.
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def score(fn: nn.Module) -> float:
        total = 0.0
        with torch.inference_mode():
            for b in sizes:
                x = first_row_batch(example, b)
                fn(x)  # first call after a switch of form: caches, allocator
                times = []
                for _ in range(iters):
                    t0 = clock()
                    fn(x)
                    times.append(clock() - t0)
                total += sorted(times)[len(times) // 2]
        return total

    timings = {key: score(fn) for key, fn in forms.items()}
    best = min(timings, key=timings.__getitem__)
    logger.info("inference form: %s (sum over batch sizes %s): %s",
                ", ".join(f"{k[:-2]} {v * 1e3:.2f} ms" for k, v in timings.items()), sizes, best[:-2])  # fmt: skip
    return forms[best], {**timings, "compile_s": compile_s}


INFERENCE_FORMS = ("FoldedInference", "CompiledInference", "OneDNNInference", "ScriptedInference")
"""The fp32 inference forms `fastest_inference_module` picks from, by the class name recorded for them
(`inference_form_record`); "FoldedInference" names `inference_module(model)`, the BN-folded eager copy."""


def _cpu_model() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) ..."): /proc/cpuinfo on Linux, else platform.processor()."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_fingerprint() -> dict[str, object]:
    """What a timed choice of inference form depends on besides the model, the input shape and the batch sizes:
    the CPU (model name, architecture, logical cores) and the PyTorch build (version, which fixes inductor's and
    oneDNN's code). Two nodes with equal fingerprints run the same kernels at the same speeds, so a form timed on
    one holds on the other."""
    import os
    import platform

    return {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__}


def inference_form_name(form: nn.Module) -> str:
    """The recorded name of a form `fastest_inference_module` returned (one of INFERENCE_FORMS)."""
    if isinstance(form, (CompiledInference, OneDNNInference, ScriptedInference)):
        return type(form).__name__
    if isinstance(form, nn.Module):
        return "FoldedInference"
    raise TypeError(f"form must be an nn.Module, got {type(form).__name__}")


def inference_form_record(form: nn.Module, batch_sizes: Iterable[int], threads: int | None = None) -> dict:
    """What an artifact's manifest records of the fp32 form that was timed for it (models.artifact.save_artifact's
    `inference_form`; read back by serve_app.form_choice.from_manifest): the form's name, the batch sizes it was
    chosen and planned at, the torch threads it ran at (default: this thread's), `machine_fingerprint()` and, for
    the oneDNN form, the form each conv runs per batch size (`OneDNNInference.choices`)."""
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive ints, got {sizes}")
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    rec = {"form": inference_form_name(form), "batch_sizes": sizes, "threads": threads, **machine_fingerprint()}
    if isinstance(form, OneDNNInference):  # its per-conv plans as timed, rebuilt without timing
        if form.batch_sizes != sorted(set(sizes)):
            raise ValueError(f"batch_sizes must be the form's own {form.batch_sizes}, got {sizes}")
        rec["choices"] = [list(c) for c in form.choices]
    return rec


class OneDNNInference(nn.Module):
    """`onednn_inference_module(model, ...)` planned once per batch size in `batch_sizes` (which convs are
    packed, and for which input size, depends on the batch: at batch 1 most small convs run faster plain); a call
    runs the plan of the largest planned batch size <= its own (the smallest plan below that). Outputs equal
    `model.eval()(x)` (float rounding aside); always under inference_mode."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        batch_sizes: Iterable[int],
        *,
        iters: int = 5,
        choices: list[list[int]] | None = None,
    ):
        """`choices`: the `choices` of an earlier plan of this model on this input shape and these batch sizes
        (what an artifact's manifest records, models.fuse.inference_form_record): the same plans, not timed."""
        super().__init__()
        if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[0] < 1:
            raise ValueError(f"example must be a (N >= 1, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
        sizes = sorted(set(batch_sizes))
        if not sizes or any(not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {sizes}")
        if choices is not None and (not isinstance(choices, list | tuple) or len(choices) != len(sizes)):
            raise ValueError(f"choices must be one list per batch size {sizes}, got {choices!r}")
        self.batch_sizes = sizes
        planned = [
            _plan_onednn(
                model,
                first_row_batch(example, b),
                iters=iters,
                choices=None if choices is None else list(choices[i]),
            )
            for i, b in enumerate(sizes)
        ]
        self.plans = nn.ModuleList(p[0] for p in planned)
        self.choices = [p[1] for p in planned]
        """Per batch size, the form index each conv runs (what `choices` rebuilds)."""

    def plan_for(self, batch: int) -> nn.Module:
        i = max((i for i, b in enumerate(self.batch_sizes) if b <= batch), default=0)
        return self.plans[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.plan_for(x.shape[0])(x)


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
                x = first_row_batch(example, b)
                t0 = time.perf_counter()
                self(x)
                seconds[b] = time.perf_counter() - t0
                logger.info("CompiledInference: batch %d ready in %.1f s", b, seconds[b])
        return seconds


class ScriptedInference(nn.Module):
    """`folded` (an `inference_module` copy) traced by TorchScript and frozen (weights as constants): a call is one
    call into C++ that runs the whole graph with the GIL released, and takes the GIL back once.

    Why it is a form: every eager op (and every kernel call of inductor's Python wrapper, and each oneDNN
    primitive of OneDNNInference) releases the GIL and must take it back, and a thread waiting for the GIL waits
    up to the switch interval (5 ms) while another thread runs Python. A replica runs three (Serve's HTTP loop,
    the user-code loop, this forward), so under load a forward of ~20 ops waited far longer than it computed.
    bench/inference_forms.py measures it (bench/results/inference_forms.json: one torch thread, two threads
    spinning in Python beside it): the traced form's median wall time per forward was 0.24x (`tiny`) and 0.12x
    (`small`) the best other form's, and alone it was the fastest too (0.095 ms at batch 1 on `tiny` against
    0.15-0.19 ms), by the thread CPU time `fastest_inference_module` scores.

    The trace is taken at batch 2 and checked against `folded` at batches 1 and 3 (a model whose graph depends on
    the batch, or that tracing cannot follow, raises ValueError: not this form). Rebuilt for each model (a hot
    update traces again: milliseconds on these models, no compile)."""

    def __init__(self, folded: nn.Module, example: torch.Tensor, *, atol: float = 1e-4, rtol: float = 1e-4):
        super().__init__()
        if not isinstance(folded, nn.Module):
            raise TypeError(f"folded must be an nn.Module, got {type(folded).__name__}")
        if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
            raise ValueError(f"example must be a batch of inputs, got {getattr(example, 'shape', example)!r}")
        self.folded = folded

        def batch(n: int) -> torch.Tensor:  # rows that differ: a trace that mixed rows up would not pass
            return first_row_batch(example, n) + torch.linspace(0, 1, n).view(n, *[1] * (example.dim() - 1)).to(example)

        try:
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                scripted = torch.jit.freeze(torch.jit.trace(folded.eval(), batch(2), check_trace=False).eval())
                for n in (1, 3, 2):  # batch sizes the trace did not see, and the one it did (frozen weights)
                    x = batch(n)
                    torch.testing.assert_close(scripted(x), folded(x), atol=atol, rtol=rtol)
        except (RuntimeError, AssertionError, TypeError) as e:  # tracing failed, or the graph is not the model's
            raise ValueError(f"{type(folded).__name__} cannot be traced as one graph: {e}") from e
        # not registered as a submodule: its constants are `folded`'s weights, and state_dict() must list them once
        self.__dict__["_scripted"] = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of `x`, as an inference tensor (no autograd)."""
        with torch.inference_mode():
            return self._scripted(x)


_ONEDNN_UNARY: dict[str, tuple[str, list[float]]] = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
    "silu": ("swish", []),
}
"""oneDNN post-op (attr, scalars) of each activation of kernels/activations.py."""
_RELU_CALLS = (torch.relu, F.relu, torch.relu_)


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's fused conv ops (the ones inductor's freezing pass emits on CPU)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


class OneDNNConvAct(nn.Module):
    """One folded conv (+ activation, + an optional residual add before it) in one of three ways, chosen per layer
    by timing (`onednn_inference_module`):
      - packed: a single oneDNN primitive, `torch.ops.mkldnn._convolution_pointwise` with the activation as a
        post-op, or its `.binary` overload with the add as a binary post-op and then the activation (the calls
        inductor's CPU freezing pass emits, here in eager), the weight prepacked once into oneDNN's blocked
        layout for the input size it was planned on (`_reorder_convolution_weight`). It wins where the conv is
        big: measured here 170 us against F.conv2d's 214 us for 256 channels on 4x4 maps at batch 1.
      - plain: F.conv2d, then the add and the activation in place on the conv's own output. The pointwise op
        costs about 20 us more per call than F.conv2d (26 against 8.5 us for 16 channels on 8x8 at batch 1),
        so small convs stay plain.
      - winograd (`winograd` = m, 2 or 4; stride-1 3x3 convs only): kernels/winograd.py's F(m x m, 3 x 3), then
        the add and the activation in place. oneDNN's direct convs already run near this CPU's peak, so only
        fewer multiplications help: resnet18 32x32 at batch 32, 512 channels on 4x4 maps 8.3 ms against
        oneDNN's best 13.9; 256 on 8x8 7.2 (m=4) against 13.3; but 69.9 (m=2) against 14.0 for 64 channels on
        32x32, whose transforms cost more than they save.
    Activations are channels_last where the maps have at least `_CL_MIN_PIXELS` pixels, NCHW below (oneDNN's
    channels_last kernels are slower on tiny maps: kernels.conv_bn._cpu_layout), unless `channels_last` says
    otherwise: the plain form is also timed NCHW, which won on resnet18's 4x4 maps at batch 32 (512 channels:
    14.3 ms against 21.8 channels_last and 20.3 packed, whose primitive is channels_last). Any batch size works;
    a packed weight planned on another batch only changes oneDNN's kernel choice. Inference only: no autograd formula,
    and the weights are plain tensors, not parameters."""

    def __init__(
        self,
        folded: FoldedConvAct,
        input_size: list[int],
        *,
        residual_act: str | None = None,
        packed: bool = True,
        channels_last: bool | None = None,
        winograd: int = 0,
    ):
        super().__init__()
        if folded.act.name not in _ONEDNN_UNARY:
            raise ValueError(f"act must be one of {sorted(_ONEDNN_UNARY)}, got {folded.act.name!r}")
        if residual_act is not None and (folded.act.name != "none" or residual_act not in _ONEDNN_UNARY):
            raise ValueError(
                f"a residual add fuses after an act='none' conv with an activation in {sorted(_ONEDNN_UNARY)}, "
                f"got act={folded.act.name!r}, residual_act={residual_act!r}"
            )
        self.padding, self.stride = list(folded.padding), list(folded.stride)
        self.dilation, self.groups = list(folded.dilation), folded.groups
        if channels_last is not None and not isinstance(channels_last, bool):
            raise TypeError(f"channels_last must be a bool or None, got {type(channels_last).__name__}")
        rule = input_size[-1] * input_size[-2] >= _CL_MIN_PIXELS
        self.channels_last = rule if channels_last is None else channels_last
        if winograd:
            if winograd not in WINOGRAD_TILES:
                raise ValueError(f"winograd must be 0 or one of {WINOGRAD_TILES}, got {winograd!r}")
            if not _winograd_fits(folded):
                raise ValueError(f"winograd needs a stride-1, 3x3, ungrouped conv, got {folded.extra_repr()}")
            packed, self.channels_last = False, True  # its tiles are gathered from channels_last rows
        self.winograd = winograd
        self.residual_act, self.packed, self.input_size = residual_act, packed, list(input_size)
        self.act = get_activation(residual_act if residual_act is not None else folded.act.name)
        self.attr, self.scalars = _ONEDNN_UNARY[self.act.name]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        w = folded.weight.detach().contiguous(memory_format=fmt)
        if packed:
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w, self.padding, self.stride, self.dilation, self.groups, self.input_size
            )
        elif winograd:
            w = winograd_weight(folded.weight.detach(), winograd)  # (a^2, C, K)
        self.weight, self.bias = w, folded.bias.detach().clone()
        self.shape = tuple(folded.weight.shape)

    def extra_repr(self) -> str:
        add = f", + residual then {self.residual_act}" if self.residual_act is not None else ""
        return (
            f"{self.shape}, stride={self.stride}, act={self.act.name if add == '' else 'none'}{add}, "
            f"{self._kind()}, {'channels_last' if self.channels_last else 'NCHW'}"
        )

    def _kind(self) -> str:
        return f"winograd F({self.winograd}, 3)" if self.winograd else "packed" if self.packed else "plain"

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        x = self._layout(x)
        if not self.packed:
            if self.winograd:
                y = winograd_conv3x3(x, self.weight, self.bias, self.winograd, self.padding[0])
            else:
                y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            if other is not None:
                y += other
            return self.act.forward_(y)  # y is ours; inference only
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, self.attr,
                self.scalars, "",
            )  # fmt: skip
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, self._layout(other), self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, self.attr, self.scalars, "",
        )  # fmt: skip


def _winograd_fits(folded: FoldedConvAct) -> bool:
    """A stride-1, undilated, ungrouped 3x3 conv with equal padding on both axes (what kernels/winograd.py does)."""
    return (
        tuple(folded.weight.shape[-2:]) == (3, 3)
        and tuple(folded.stride) == (1, 1)
        and tuple(folded.dilation) == (1, 1)
        and folded.groups == 1
        and folded.padding[0] == folded.padding[1]
    )


_FLUSH_BYTES = 8 << 20
"""Written before each timed call while planning: twice the per-core L2 of the CPUs measured here (4 MiB)."""


_ALT_MARGIN = 0.9
"""A form beyond packed and plain in the pixel rule's layout is chosen only at <= this share of their time."""


_PACKED_MIN_CHANNELS = 128
"""At batch 1, convs with fewer input channels never run packed (`_ConvChoice`). Timed on their own, packed
16-64 channel convs of `small` won by > 10% and were chosen, but in the model they ran slower: five plans of
`small` 32x32 at batch 1 with a packed conv ran at 0.77-0.87 of eager, those without at 0.63-0.76 (interleaved
A/Bs, 1 thread, shared machine). Still timed where packed wins: resnet18's 256-512 channel convs on 1x1-4x4
maps, and every conv at batch > 1 (`small` 32x32 at batch 32 ran 0.55-0.59 of eager with packed timed,
0.58-0.61 without, in one run)."""
_SHORT_CALL_S = 0.5e-3
_SHORT_CALL_ITERS = 3
"""A conv whose fastest form took under _SHORT_CALL_S (median of its `iters` timed calls) is timed
_SHORT_CALL_ITERS times as often (`_ConvChoice`): batch-1 convs of `small` take 20-150 us, where a shared
machine's noise decided near ties, and more calls cost little."""


class _ConvChoice(nn.Module):
    """The candidate `OneDNNConvAct`s of one conv while `onednn_inference_module` plans: packed, plain in the
    pixel rule's layout, plain in the other and, for a stride-1 3x3 conv, Winograd F(2, 3) and F(4, 3) (the last
    three only when `_ALT_MARGIN` faster than the first two; packed at batch 1 from `_PACKED_MIN_CHANNELS` on). Its
    first call (the
    planning forward) times each on the arguments it really gets, so in the layout the layer before it chose
    (a form that wants the other layout pays its copy), interleaved, median of `iters` calls after one that
    creates oneDNN's primitive, by this thread's CPU time (a loaded machine does not inflate it), with the core's
    cache flushed before each call (in a model every layer's weights and input were pushed out of it by the
    layers between two calls: timed with a hot cache, Winograd's 4x larger transformed weights looked faster at
    batch 1 than they ran in resnet18, 0.99 of eager against 0.81); then `chosen` is the fastest and every call
    runs it. Deciding on random data of the right size alone, with each form's
    favourite layout for free, chose NCHW and channels_last in turn from layer to layer: resnet18 8x8 at batch
    32 then ran 0.94 of eager against 0.67 with the fixed layout rule."""

    def __init__(self, folded: FoldedConvAct, input_size: list[int], residual_act: str | None, iters: int):
        super().__init__()
        kw = {"residual_act": residual_act}
        rule = input_size[-1] * input_size[-2] >= _CL_MIN_PIXELS  # the layout before the other forms were timed
        forms = [
            OneDNNConvAct(folded, input_size, **kw, packed=True),
            OneDNNConvAct(folded, input_size, **kw, packed=False, channels_last=rule),
            OneDNNConvAct(folded, input_size, **kw, packed=False, channels_last=not rule),
        ]
        # at batch 1 timed only from _PACKED_MIN_CHANNELS on (its index stays 0: an untimed form is never chosen)
        self.packed_timed = input_size[0] > 1 or folded.weight.shape[1] * folded.groups >= _PACKED_MIN_CHANNELS
        if _winograd_fits(folded):
            forms += [OneDNNConvAct(folded, input_size, **kw, winograd=m) for m in WINOGRAD_TILES]
        self.forms = nn.ModuleList(forms)
        self.iters = iters
        self.chosen: OneDNNConvAct | None = None

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        if self.chosen is None:
            flush = torch.empty(_FLUSH_BYTES // 4)
            times: dict[int, list[float]] = {j: [] for j in range(len(self.forms)) if j or self.packed_timed}
            i, calls = 0, self.iters
            while i <= calls:
                for j in list(times):
                    o = None if other is None else other.clone()  # a binary post-op may write into it
                    flush.fill_(float(i))
                    t0 = time.thread_time()
                    self.forms[j](x, o)
                    if i:
                        times[j].append(time.thread_time() - t0)
                if i == 1:  # forms 1.5x slower than the best on their first timed call are out: half the planning
                    best = min(t[0] for t in times.values())
                    times = {j: t for j, t in times.items() if t[0] <= 1.5 * best}
                if i == calls == self.iters and min(sorted(t)[len(t) // 2] for t in times.values()) < _SHORT_CALL_S:
                    calls *= _SHORT_CALL_ITERS  # cheap to time more, and the noise is largest against their time
                i += 1
            medians = {j: sorted(t)[len(t) // 2] for j, t in times.items()}
            best = min(medians, key=medians.__getitem__)
            base = min((j for j in medians if j < 2), key=medians.__getitem__, default=None)
            # the other layout and Winograd must beat the two measured defaults by 10%: picked on a near tie,
            # they ran resnet18 32x32 at batch 1 at 0.815 of eager against 0.765 (their layout copies, and cache
            # effects the single-conv timing misses); where they win (batch 32) they win by 1.5-1.9x
            if base is not None and medians[best] > _ALT_MARGIN * medians[base]:
                best = base
            self.chosen = self.forms[best]
        return self.chosen(x, other)


def _resolve_choices(module: nn.Module) -> nn.Module:
    """`module` with each planned `_ConvChoice` replaced by the form it chose (an unplanned one, never called by
    the planning forward, by its plain form in the pixel rule's layout)."""
    if isinstance(module, _ConvChoice):
        return module.chosen or module.forms[1]
    for name, child in list(module.named_children()):
        new = _resolve_choices(child)
        if new is not child:
            setattr(module, name, new)
    return module


class _FoldedLeaves(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FoldedConvAct) or super().is_leaf_module(m, module_qualified_name)


def _relu_node(node: fx.Node, root: nn.Module) -> bool:
    if node.op == "call_module":
        return type(root.get_submodule(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_CALLS and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def onednn_inference_module(model: nn.Module, example: torch.Tensor, *, iters: int = 5) -> nn.Module:
    """`inference_module(model)` with each `FoldedConvAct` run as an `OneDNNConvAct`, planned by timing on
    `example` (`_plan_onednn`)."""
    return _plan_onednn(model, example, iters=iters)[0]


def _plan_onednn(
    model: nn.Module, example: torch.Tensor, *, iters: int = 5, choices: list[int] | None = None
) -> tuple[nn.Module, list[int]]:
    """(`inference_module(model)` with each `FoldedConvAct` run as an `OneDNNConvAct`: a single oneDNN primitive
    (weight prepacked for its input size, the activation as a post-op), F.conv2d channels_last or NCHW, or
    Winograd, whichever timed fastest on the planning forward over `example` (`_ConvChoice`); each
    `conv(act='none') + other -> relu` of a residual block is one module (the add a binary post-op of the
    primitive, as inductor's freezing pass would emit, without a compile). The copy is traced with torch.fx
    (which also drops the per-module Python calls of nested containers); a module fx cannot trace has its
    children rewritten one by one. `example` (N >= 1, C, H, W) gives the input sizes planned for. CPU float32
    only: raises ValueError otherwise, and RuntimeError where this PyTorch lacks the ops. Returns it with the
    index of the form each conv chose (`_ConvChoice.forms`, in module order); given those `choices` (from a plan
    of the same model and input size), it is built with them and nothing is timed.)"""
    if not isinstance(example, torch.Tensor) or example.dim() != 4 or example.shape[0] < 1:
        raise ValueError(f"example must be a (N >= 1, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    if example.device.type != "cpu" or example.dtype != torch.float32:
        raise ValueError(f"example must be a CPU float32 tensor, got {example.device} {example.dtype}")
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN fused conv ops (torch.ops.mkldnn._convolution_pointwise)")
    plain = inference_module(model)
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in plain.parameters()):
        raise ValueError("model must have CPU float32 parameters for the oneDNN form")
    sizes: dict[str, list[int]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: sizes.__setitem__(name, list(args[0].shape)))
        for name, m in plain.named_modules()
        if isinstance(m, FoldedConvAct)
    ]
    try:
        with torch.inference_mode():
            plain(example)
    finally:
        for h in hooks:
            h.remove()
    counts = [0, 0]  # convs, residual adds fused
    form = _onednn_rewrite(plain, "", sizes, iters, counts)
    planned = [m for m in form.modules() if isinstance(m, _ConvChoice)]
    if choices is None:
        with torch.inference_mode():
            form(example)  # the planning forward: each conv times its forms on its real input (_ConvChoice)
    else:
        if len(choices) != len(planned) or any(
            not isinstance(j, int) or not 0 <= j < len(c.forms) for c, j in zip(planned, choices)
        ):
            raise ValueError(f"choices must be one form index per planned conv ({len(planned)}), got {choices!r}")
        for c, j in zip(planned, choices):
            c.chosen = c.forms[j]
    # an unplanned conv (never called by the planning forward) runs its plain form in the rule's layout (1)
    chose = [next((j for j, f in enumerate(c.forms) if f is c.chosen), 1) for c in planned]
    form = _resolve_choices(form)
    if isinstance(form, fx.GraphModule):
        form.recompile()
    logger.info("oneDNN form: %d convs, %d with the residual add fused", *counts)
    return form, chose


def _onednn_rewrite(module: nn.Module, path: str, sizes: dict[str, list[int]], iters: int, counts: list[int]):
    """`module` (at `path` in the folded model) with its FoldedConvActs made OneDNNConvActs: a GraphModule with
    the residual adds fused where fx traces it, else the module with each child rewritten in place (a forward
    that checks its input's shape or branches on data does not trace; its children usually do)."""
    if isinstance(module, FoldedConvAct):
        if path in sizes:
            counts[0] += 1
            return _ConvChoice(module, sizes[path], None, iters)
        return module
    if not any(isinstance(m, FoldedConvAct) for m in module.modules()):
        return module  # nothing to rewrite: no trace, no GraphModule around a plain layer
    try:
        with FX_TRACE_LOCK:
            graph = _FoldedLeaves().trace(module)
    except Exception as e:  # noqa: BLE001 - data-dependent control flow, shape checks, ...: children one by one
        logger.debug("oneDNN form: %s does not trace with fx (%s); its children are rewritten", path or "model", e)
        for name, child in list(module.named_children()):
            new = _onednn_rewrite(child, _join(path, name), sizes, iters, counts)
            if new is not child:
                setattr(module, name, new)
        return module
    gm = fx.GraphModule(module, graph)
    for node in list(gm.graph.nodes):  # fuse_ leaves nn.Identity where the BN and act were: out of the way
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), FoldedConvAct):
            continue
        conv: FoldedConvAct = gm.get_submodule(node.target)
        size = sizes.get(_join(path, node.target))
        if size is None:
            continue  # never called on the example: left as it is
        counts[0] += 1
        new_name = f"onednn_{counts[0]}"
        add = next(iter(node.users)) if len(node.users) == 1 else None
        relu = next(iter(add.users)) if add is not None and len(add.users) == 1 else None
        if (
            conv.act.name == "none"
            and add is not None
            and add.op == "call_function"
            and add.target in (operator.add, torch.add)
            and len(add.args) == 2
            and not add.kwargs
            and relu is not None
            and _relu_node(relu, gm)
            and isinstance(other := add.args[1] if add.args[0] is node else add.args[0], fx.Node)
        ):
            gm.add_submodule(new_name, _ConvChoice(conv, size, "relu", iters))
            with gm.graph.inserting_before(relu):
                new = gm.graph.call_module(new_name, (node.args[0], other))
            relu.replace_all_uses_with(new)
            for dead in (relu, add, node):
                gm.graph.erase_node(dead)
            counts[1] += 1
        else:
            gm.add_submodule(new_name, _ConvChoice(conv, size, None, iters))
            node.target = new_name
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
