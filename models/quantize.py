"""`quantize_(model, Int8PTQ() | Int8QAT() | FP8(), calib=...)`: post-training and quantization-aware
INT8, and FP8 (e4m3), for a `models.cnn.CNN` (pruned or not).

Every scheme first folds BN into the convs (`fold_bn_`: each `ConvBNAct` becomes `Sequential(Conv2d, act)`),
since inference never runs BN. Then:

- INT8 (both schemes end in the same format): the conv/linear weights are snapped to their symmetric int8 grid
  with `kernels.quant` (per output channel, or one scale per tensor), activations are calibrated, and the
  model is lowered through PT2E: `torch.export` -> `prepare_pt2e(X86InductorQuantizer)` -> calibration ->
  `convert_pt2e`. That graph runs as is (reference int8 ops, exact, used to check artifacts) and through
  `QuantizedModel.compile_()` (inductor with freezing: oneDNN int8 convs, the fast path on x86 CPUs).
  Activation observers are min/max (not the default histogram) so that the whole calibration result is a
  pair of floats per observer: an artifact stores int8 weights + scales + those ranges, and rebuilding runs
  the same export/prepare/convert with the stored ranges, which reproduces the converted graph exactly
  (PT2E re-derives its per-channel weight scales from the snapped weights; the snapped weights are stored,
  not re-derived, so the rebuild sees bit-identical floats).
- `Int8QAT` first fine-tunes the folded model with fake quantization in the loop (weights: int8 fake-quant
  from `kernels.quant` with a straight-through gradient; activations: uint8 affine fake-quant on every
  conv/linear input with moving-average ranges, as deployed), then takes the PTQ path above.
- `FP8`: e4m3 weights (per output channel or per tensor) and static per-tensor e4m3 input scales calibrated
  from amax; on a GPU with FP8 tensor cores (compute capability >= 8.9) convs run as im2col +
  `torch._scaled_mm` (row-wise scales, bf16 out); elsewhere the same numbers are emulated in fp32
  (fake-quant), which is what accuracy is measured with on CPU.

Artifacts (models/artifact.py) store `QuantizedModel.artifact_state()` and rebuild with `restore_quantized`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv_bn import ConvBNAct
from kernels.precision import PrecisionConfig, PrecisionPolicy
from kernels.quant import dequantize, fake_quantize, quantize
from models.cnn import ModelConfig

FP8_DTYPE = torch.float8_e4m3fn


def _check_common(per_channel: bool, calib_samples: int) -> None:
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {type(per_channel).__name__}")
    if not isinstance(calib_samples, int) or calib_samples < 1:
        raise ValueError(f"calib_samples must be a positive int, got {calib_samples!r}")


@dataclass(kw_only=True, slots=True)
class Int8PTQ:
    """Post-training INT8: symmetric int8 weights, calibrated uint8 activations, run through PT2E/inductor."""

    scheme: ClassVar[str] = "int8_ptq"
    per_channel: bool = True
    """One weight scale per output channel (True) or per tensor (False)."""
    calib_samples: int = 256
    """Calibration samples used (the first ones of `calib`)."""

    def __post_init__(self) -> None:
        _check_common(self.per_channel, self.calib_samples)


@dataclass(kw_only=True, slots=True)
class Int8QAT:
    """INT8 after quantization-aware fine-tuning (fake quant in the loop); same end format as Int8PTQ."""

    scheme: ClassVar[str] = "int8_qat"
    per_channel: bool = True
    """One weight scale per output channel (True) or per tensor (False)."""
    calib_samples: int = 256
    """Calibration samples used for the final activation ranges."""
    epochs: int = 1
    """Fine-tuning epochs with fake quantization."""
    lr: float = 0.005
    """SGD learning rate (momentum 0.9, cosine decay) of the fine-tuning."""
    batch_size: int = 64
    """Fine-tuning batch size."""
    seed: int = 0
    """Seed of the fine-tuning shuffles."""

    def __post_init__(self) -> None:
        _check_common(self.per_channel, self.calib_samples)
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.lr, int | float) or not (0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


@dataclass(kw_only=True, slots=True)
class FP8:
    """FP8 e4m3 weights and activations: torch._scaled_mm on FP8 GPUs, fake-quant emulation elsewhere."""

    scheme: ClassVar[str] = "fp8"
    per_channel: bool = True
    """One weight scale per output channel (True) or per tensor (False)."""
    calib_samples: int = 256
    """Calibration samples for the static activation scales."""

    def __post_init__(self) -> None:
        _check_common(self.per_channel, self.calib_samples)


QuantConfig = Int8PTQ | Int8QAT | FP8
CONFIGS: dict[str, type] = {c.scheme: c for c in (Int8PTQ, Int8QAT, FP8)}


# ---------------------------------------------------------------------------------------------- BN folding


def _conv_from(op: ConvBNAct) -> nn.Conv2d:
    c = op.conv
    conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups, bias=True)
    with torch.no_grad():
        w, b = op.folded()
        conv.weight.copy_(w)
        conv.bias.copy_(b)
    return conv


@torch.no_grad()
def fold_bn_(model: nn.Module) -> nn.Module:
    """Replaces every `ConvBNAct` in `model` by `Sequential(Conv2d with BN folded in, activation)`, in place
    (eval-mode function unchanged). Returns `model`."""
    for name, child in list(model.named_children()):
        if isinstance(child, ConvBNAct):
            act = ConvBNAct.activation_module(child.act.name)
            setattr(model, name, nn.Sequential(_conv_from(child.eval()), act))
        else:
            fold_bn_(child)
    return model.eval()


def _quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


# ------------------------------------------------------------------------------------------ the wrapper


class BucketCompiled:
    """Inductor with freezing (weights as constants; on x86 the int8 convs become oneDNN kernels) on static
    shapes: freezing's int8 weight pre-packing needs concrete sizes, so one graph is built (`build(example)`)
    and compiled per batch bucket (powers of two), inputs are zero-padded to their bucket and outputs sliced.
    The first call of each bucket compiles (tens of seconds on 2 cores); `warmup` does it ahead."""

    def __init__(self, build: Callable[[torch.Tensor], nn.Module]):
        self.build = build
        self._fns: dict[int, Callable] = {}
        # freezing must be on while AOT autograd traces (the first call, and any recompile), not only inside
        # inductor, or the weights stay graph inputs and int8 pre-packing fails on fake tensors: so a config
        # patch around every call (built once: entering it costs microseconds), not `options=`.
        self._freezing = torch._inductor.config.patch(freezing=True)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        b = 1 << max(n - 1, 0).bit_length()
        # Every bucket's graph is called with an inference tensor (the padded copy, or a copy made here; a batch
        # of images, microseconds): dynamo guards a graph on its input's dispatch keys, so a normal tensor (a
        # caller outside inference_mode, or a view of one) and an inference tensor (the serving replica's, made
        # under inference_mode) each compiled the bucket once more. A replica warmed up with the one and served
        # with the other paid that recompile in its first request (1.6 s against 8-11 ms after it).
        with torch.inference_mode():
            if b != n:
                x = torch.cat([x, x.new_zeros(b - n, *x.shape[1:])])
            elif not x.is_inference():
                x = x.clone()
        fn = self._fns.get(b)
        if fn is None:
            fn = self._fns[b] = torch.compile(self.build(x.clone()), dynamic=False)  # export takes a normal one
        with torch.inference_mode(), self._freezing:
            return fn(x)[:n]

    def warmup(self, example: torch.Tensor, batch_sizes: Iterable[int]) -> None:
        """Compiles the buckets of `batch_sizes` using rows of `example` (N >= 1, C, H, W)."""
        from models.fuse import first_row_batch  # models.fuse does not import this module

        for b in batch_sizes:
            self(first_row_batch(example, b))


def compiled_for_inference(
    model: nn.Module, example: torch.Tensor | None = None, batch_sizes: Iterable[int] = (1, 32)
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fast CPU inference callable of a `QuantizedModel` (its `compile_()`) or of an fp32 model: with an
    `example` input, the form Serve runs (models.fuse.fastest_inference_module: BN folded, compiled or not,
    whichever timed faster on `batch_sizes`); without one, the compiled form."""
    if isinstance(model, QuantizedModel):
        return model.compile_()
    # the served fp32 form; models.fuse does not import this module
    from models.fuse import fastest_inference_module, inference_module

    if example is None:
        return inference_module(model, compile=True)
    return fastest_inference_module(model, example, batch_sizes)[0]


class QuantizedModel(nn.Module):
    """A quantized model: `runtime` computes the logits (reference graph); `compile_()` switches to the
    inductor-compiled one (`BucketCompiled`). Holds what an artifact needs to rebuild it: `source`, the
    description of the fp32 model (models.factory.describe), the stored tensors and the scheme's state."""

    def __init__(
        self,
        runtime: nn.Module,
        config: QuantConfig,
        source: dict,
        tensors: dict[str, torch.Tensor],
        state: dict,
        static_build: Callable[[torch.Tensor], nn.Module] | None = None,
    ):
        super().__init__()
        self.runtime = runtime
        self._static_build = static_build or (lambda example: runtime)
        self.config = config
        self.source = source
        self._tensors = tensors
        self._state = state
        self._compiled = None

    @property
    def model_config(self) -> ModelConfig | None:
        """The preset CNN's config (None for a user model)."""
        cfg = self.source.get("model_config")
        return None if cfg is None else ModelConfig.from_dict(cfg)

    @property
    def channels(self) -> dict[str, int] | None:
        """The CNN's ConvBNAct channel counts (None for a user model)."""
        return self.source.get("channels")

    @property
    def scheme(self) -> str:
        return self.config.scheme

    def artifact_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors to store, the manifest's "quantization" entry)."""
        quant = {"scheme": self.scheme, "config": asdict(self.config), "state": self._state}
        return dict(self._tensors), quant

    def compile_(self, example: torch.Tensor | None = None, batch_sizes: Iterable[int] = ()) -> QuantizedModel:
        """Routes forward through inductor (`BucketCompiled`); with an `example` input, the buckets of
        `batch_sizes` are compiled now. CPU runtimes only (the FP8 GPU path runs eagerly)."""
        self._compiled = BucketCompiled(self._static_build)
        if example is not None:
            self._compiled.warmup(example, batch_sizes)
        return self

    def train(self, mode: bool = True) -> QuantizedModel:
        # Inference only; exported PT2E graphs refuse train()/eval(), so the flag is not propagated.
        self.training = mode
        return self

    @property
    def compiled(self) -> bool:
        """True once `compile_()` routed forward through inductor."""
        return self._compiled is not None

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the reference graph (what an artifact records and a rebuild reproduces exactly), whether or
        not `compile_()` was called."""
        with torch.no_grad():
            return self.runtime(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.runtime if self._compiled is None else self._compiled)(x)


# ------------------------------------------------------------------------------------------------ INT8


def _snap_int8_(folded: nn.Module, per_channel: bool) -> dict[str, torch.Tensor]:
    """Puts every conv/linear weight on its int8 grid (in place); returns the tensors an artifact stores."""
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, m in _quantizable(folded):
            q, s = quantize(m.weight, torch.int8, per_channel)
            m.weight.copy_(dequantize(q, s))
            tensors[f"{name}.weight.q"], tensors[f"{name}.weight.scale"] = q, s
            tensors[f"{name}.bias"] = m.bias.detach().clone()
    return tensors


def _check_shapes(folded: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, m in _quantizable(folded):
        for key, want in (("weight.q", m.weight.shape), ("bias", m.bias.shape)):
            got = tensors[f"{name}.{key}"].shape
            if got != want:
                raise ValueError(f"{name}.{key} must have shape {tuple(want)}, got {tuple(got)}")


def _load_int8_(folded: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, m in _quantizable(folded):
            m.weight.copy_(dequantize(tensors[f"{name}.weight.q"], tensors[f"{name}.weight.scale"]))
            m.bias.copy_(tensors[f"{name}.bias"])


def _x86_quantizer():
    from torchao.quantization.pt2e.observer import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    default = get_default_x86_inductor_quantization_config()
    act = QuantizationSpec(  # the default's uint8 affine spec, with a min/max observer (see module docstring)
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12),
    )
    cfg = QuantizationConfig(act, act, default.weight, default.bias, False)
    return X86InductorQuantizer().set_global(cfg)


def _prepare(folded: nn.Module, example: torch.Tensor, dynamic: bool = True):
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from models.fuse import FX_TRACE_LOCK

    shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic else None
    with FX_TRACE_LOCK:  # export traces with an fx tracer too: not beside a serving forward (models.fuse)
        exported = torch.export.export(folded.eval(), (example,), dynamic_shapes=shapes).module()
    _split_shared_sources_(exported)
    return prepare_pt2e(exported, _x86_quantizer())


def _split_shared_sources_(gm: torch.fx.GraphModule) -> None:
    """Gives each call of a module called several times (torchvision's BasicBlock calls one `self.relu` twice) a
    source of its own. The x86 quantizer groups nodes into patterns by their source module; one ReLU module used
    after a conv and after a residual add is one "partition" with two outputs, and annotation then fails with
    "Input partition has more than one output node". Only groups of single-op calls are split (activations),
    so real multi-node partitions stay as they are."""
    groups: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            groups.setdefault(list(stack.values())[-1][0], []).append(node)
    for fqn, nodes in groups.items():
        if len(nodes) > 1 and len({n.target for n in nodes}) == 1:
            for i, node in enumerate(nodes):
                stack = dict(node.meta["nn_module_stack"])
                key = list(stack)[-1]
                stack[key] = (f"{fqn}__call{i}", stack[key][1])
                node.meta["nn_module_stack"] = stack


def _activation_observers(prepared: nn.Module) -> dict[str, nn.Module]:
    from torchao.quantization.pt2e.observer import MinMaxObserver

    return {n: m for n, m in prepared.named_modules() if type(m) is MinMaxObserver}


def _int8_runtime(
    folded: nn.Module, ranges: dict[str, list[float]], example: torch.Tensor, dynamic: bool = True
) -> nn.Module:
    """The converted PT2E graph of `folded` (weights already on their int8 grid) with activation `ranges`;
    any batch size when `dynamic`, else only that of `example` (what inductor's freezing needs)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = _prepare(folded, example, dynamic)
    with torch.no_grad():
        prepared(example)  # the weight observers see the weights; activation ranges are set just below
        observers = _activation_observers(prepared)
        if set(observers) != set(ranges):
            raise ValueError(f"activation observers {sorted(observers)} do not match ranges {sorted(ranges)}")
        for name, (lo, hi) in ranges.items():
            observers[name].min_val.fill_(lo)
            observers[name].max_val.fill_(hi)
    return convert_pt2e(prepared)


def _calibrate_int8(folded: nn.Module, calib: torch.Tensor, batch: int = 128) -> dict[str, list[float]]:
    prepared = _prepare(folded, calib[:2])
    with torch.no_grad():
        for i in range(0, len(calib), batch):
            prepared(calib[i : i + batch])
    return {n: [o.min_val.item(), o.max_val.item()] for n, o in _activation_observers(prepared).items()}


class _ActFakeQuant:
    """Forward pre-hook: uint8 affine fake-quant of a layer input with a moving-average range (QAT)."""

    def __init__(self, momentum: float = 0.1):
        self.lo = self.hi = None
        self.momentum = momentum

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        (x,) = args
        if module.training:
            lo, hi = x.detach().min().item(), x.detach().max().item()
            if self.lo is None:
                self.lo, self.hi = lo, hi
            else:
                self.lo += self.momentum * (lo - self.lo)
                self.hi += self.momentum * (hi - self.hi)
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        scale = max(hi - lo, 2**-12) / 255.0
        zero_point = int(min(255, max(0, round(-lo / scale))))
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255),)


class _WeightFakeQuant(nn.Module):
    """Parametrization: the int8 fake-quantized weight (kernels.quant, straight-through gradient)."""

    def __init__(self, per_channel: bool):
        super().__init__()
        self.per_channel = per_channel

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, torch.int8, self.per_channel)


def _qat_finetune_(folded: nn.Module, cfg: Int8QAT, train: tuple[torch.Tensor, torch.Tensor]) -> None:
    from torch.nn.utils import parametrize

    from models.training import TrainConfig, fit_epochs

    layers = _quantizable(folded)
    hooks = [m.register_forward_pre_hook(_ActFakeQuant()) for _, m in layers]
    for _, m in layers:
        parametrize.register_parametrization(m, "weight", _WeightFakeQuant(cfg.per_channel))
    # the one training loop (models/training.py): SGD momentum 0.9, cosine from the peak (no warm-up: the
    # weights are trained already), no weight decay (it would pull weights off their int8 grid), fp32
    train_cfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=0.0,
                            warmup_epochs=0.0, bn_recompute_rows=0, seed=cfg.seed)  # fmt: skip
    try:
        fp32 = PrecisionPolicy.for_device("cpu", PrecisionConfig(train_dtype="fp32"))
        fit_epochs(folded, train, train_cfg, policy=fp32)
    finally:
        for h in hooks:
            h.remove()
        for _, m in layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        folded.eval()


# ------------------------------------------------------------------------------------------------- FP8


def _fp8_mm_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Layer(nn.Module):
    """A conv or linear layer with e4m3 weights (per-channel or per-tensor scale) and a static e4m3 input
    scale. FP8 tensor cores via torch._scaled_mm where present, else fp32 emulation of the same numbers."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, w_q: torch.Tensor, w_scale: torch.Tensor, in_scale):
        super().__init__()
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)
            self.kernel_size = layer.kernel_size
            if layer.groups != 1:
                raise ValueError(f"FP8 convs must have groups=1, got {layer.groups}")
        self.register_buffer("weight_q", w_q)  # (C_out, C_in, kh, kw) or (out, in), float8_e4m3fn
        self.register_buffer("weight_scale", w_scale.float())  # (C_out,) or (1,)
        self.register_buffer("bias", layer.bias.detach().clone().float())
        self.register_buffer("input_scale", in_scale.float().reshape(1))

    def _emulated(self, x: torch.Tensor) -> torch.Tensor:
        xq = fake_quantize(x.float(), FP8_DTYPE, per_channel=False, scale=self.input_scale)
        w = dequantize(self.weight_q, self.weight_scale)
        if self.is_conv:
            return F.conv2d(xq, w, self.bias, **self.geometry)
        return F.linear(xq, w, self.bias)

    def _scaled_mm(self, x: torch.Tensor) -> torch.Tensor:
        # rows = output positions, K = C_in * kh * kw; _scaled_mm wants A (M, K) row-major, B (K, N)
        # column-major, K and N multiples of 16, and row-wise fp32 scales (M, 1) x (1, N) with bf16 output.
        if self.is_conv:
            b, _, _, w = x.shape
            cols = F.unfold(x, self.kernel_size, **self.geometry)  # (B, K, L)
            a = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B * L, K)
        else:
            a = x.reshape(-1, x.shape[-1])
        wt = self.weight_q.reshape(self.weight_q.shape[0], -1)  # (N, K)
        m, k = a.shape
        n = wt.shape[0]
        kp, np_ = -k % 16, -n % 16
        a_q, _ = quantize(F.pad(a, (0, kp)), FP8_DTYPE, per_channel=False, scale=self.input_scale)
        w_pad = F.pad(wt.view(torch.uint8), (0, kp, 0, np_)).view(FP8_DTYPE)  # zero bytes are +0.0 in e4m3
        scale_b = F.pad(self.weight_scale.expand(n), (0, np_), value=1.0).view(1, -1)
        out = (
            torch._scaled_mm(
                a_q,
                w_pad.t(),
                scale_a=self.input_scale.expand(m).reshape(m, 1).contiguous(),
                scale_b=scale_b.contiguous(),
                out_dtype=torch.bfloat16,
            )[:, :n].float()
            + self.bias
        )
        if self.is_conv:
            g = self.geometry
            span = g["dilation"][1] * (self.kernel_size[1] - 1) + 1
            wo = (w + 2 * g["padding"][1] - span) // g["stride"][1] + 1
            return out.reshape(b, -1, n).transpose(1, 2).reshape(b, n, -1, wo)
        return out.reshape(*x.shape[:-1], n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fp8_mm_supported(x.device):
            return self._scaled_mm(x)
        return self._emulated(x)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


@torch.no_grad()
def _calibrate_amax(folded: nn.Module, calib: torch.Tensor, batch: int = 128) -> dict[str, torch.Tensor]:
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax[name], a) if name in amax else a

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in _quantizable(folded)]
    try:
        for i in range(0, len(calib), batch):
            folded(calib[i : i + batch])
    finally:
        for h in handles:
            h.remove()
    return amax


def _fp8_tensors(folded: nn.Module, per_channel: bool, amax: dict[str, torch.Tensor]) -> dict:
    tensors = {}
    for name, m in _quantizable(folded):
        q, s = quantize(m.weight.detach(), FP8_DTYPE, per_channel)
        tensors[f"{name}.weight.q"], tensors[f"{name}.weight.scale"] = q, s
        tensors[f"{name}.bias"] = m.bias.detach().clone()
        a = amax[name]
        tensors[f"{name}.input_scale"] = torch.where(a > 0, a / 448.0, torch.ones_like(a)).reshape(1)
    return tensors


def _fp8_runtime(folded: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    for name, m in _quantizable(folded):
        w_q, w_scale = tensors[f"{name}.weight.q"], tensors[f"{name}.weight.scale"]
        layer = FP8Layer(m, w_q, w_scale, tensors[f"{name}.input_scale"])
        layer.bias.copy_(tensors[f"{name}.bias"])
        _set_submodule(folded, name, layer)
    return folded.eval()


# ------------------------------------------------------------------------------------------- the verbs


class _Int8Handler:
    """INT8 PTQ and QAT: int8-snapped weights + activation ranges, lowered through PT2E (module docstring)."""

    def quantize(self, folded: nn.Module, config, calib: torch.Tensor, train) -> tuple:
        if isinstance(config, Int8QAT):
            _qat_finetune_(folded, config, train)
        tensors = _snap_int8_(folded, config.per_channel)
        ranges = _calibrate_int8(folded, calib)
        return self._build(folded, ranges, calib[:2], tensors)

    def expected(self, folded: nn.Module) -> set[str]:
        return {f"{n}.{k}" for n, _ in _quantizable(folded) for k in ("weight.q", "weight.scale", "bias")}

    def restore(self, folded: nn.Module, config, tensors: dict, state: dict, example: torch.Tensor) -> tuple:
        _load_int8_(folded, tensors)
        ranges = state.get("activation_ranges")
        if not isinstance(ranges, dict):
            raise ValueError("int8 quantization state must hold activation_ranges")
        return self._build(folded, ranges, example, tensors)

    @staticmethod
    def _build(folded, ranges, example, tensors) -> tuple:
        runtime = _int8_runtime(folded, ranges, example)
        static = functools.partial(_int8_runtime, folded, ranges, dynamic=False)
        return runtime, tensors, {"activation_ranges": ranges}, static


class _FP8Handler:
    """FP8 e4m3 weights and static input scales (FP8Layer)."""

    def quantize(self, folded: nn.Module, config, calib: torch.Tensor, train) -> tuple:
        tensors = _fp8_tensors(folded, config.per_channel, _calibrate_amax(folded, calib))
        return _fp8_runtime(folded, tensors), tensors, {}, None

    def expected(self, folded: nn.Module) -> set[str]:
        return _Int8Handler().expected(folded) | {f"{n}.input_scale" for n, _ in _quantizable(folded)}

    def restore(self, folded: nn.Module, config, tensors: dict, state: dict, example: torch.Tensor) -> tuple:
        return _fp8_runtime(folded, tensors), tensors, {}, None


# One handler per config type (as torchao's quantize_ dispatches on its config's type): a new scheme is a config
# dataclass with a `scheme` name and a handler with quantize / expected / restore.
HANDLERS: dict[type, _Int8Handler | _FP8Handler] = {
    Int8PTQ: _Int8Handler(),
    Int8QAT: _Int8Handler(),
    FP8: _FP8Handler(),
}


@torch.no_grad()
def _ensure_bias_(model: nn.Module) -> None:
    """Gives every bias-less Conv2d/Linear a zero bias (same function): stored int8 layers always carry one."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(m.weight.new_zeros(m.weight.shape[0]), requires_grad=m.weight.requires_grad)


def _fold(model: nn.Module) -> nn.Module:
    folded = fold_bn_(model)
    _ensure_bias_(folded)
    return folded


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    *,
    calib: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedModel:
    """Quantizes a `CNN` or a user model built by `ModelSpec.build` (any model torch.export can trace) with
    `config`, returning the `QuantizedModel` to use in its place. `model` itself is consumed: its BN is folded
    in place (and for QAT its weights fine-tuned). `calib` (N, C, H, W): samples for calibration (the first
    `config.calib_samples`); `train` (x, y): the fine-tuning data of Int8QAT."""
    from models.factory import describe

    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"config must be one of {[c.__name__ for c in HANDLERS]}, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 4 or len(calib) < 2:
        raise ValueError(f"calib must be a (N >= 2, C, H, W) tensor, got {getattr(calib, 'shape', calib)!r}")
    if isinstance(config, Int8QAT) and train is None:
        raise ValueError("Int8QAT needs train=(x, y) for its fine-tuning")
    source = describe(model)  # before folding: how to rebuild the fp32 model
    calib = calib[: config.calib_samples].float()
    runtime, tensors, state, static = handler.quantize(_fold(model), config, calib, train)
    return QuantizedModel(runtime, config, source, tensors, state, static_build=static)


def restore_quantized(
    model: nn.Module, quant: dict, tensors: dict[str, torch.Tensor], example: torch.Tensor
) -> QuantizedModel:
    """Rebuilds the `QuantizedModel` an artifact describes: `model` is the freshly built (and resized) fp32
    model, `quant` the manifest's "quantization" entry, `tensors` the stored ones, `example` one input batch."""
    from models.factory import describe

    scheme = quant.get("scheme")
    if scheme not in CONFIGS:
        raise ValueError(f"quantization scheme must be one of {['none', *CONFIGS]}, got {scheme!r}")
    config = CONFIGS[scheme](**quant.get("config", {}))
    handler = HANDLERS[type(config)]
    source = describe(model)
    folded = _fold(model)
    expected = handler.expected(folded)
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise ValueError(f"stored tensors {odd} are missing or unexpected for scheme {scheme}")
    _check_shapes(folded, tensors)
    runtime, tensors, state, static = handler.restore(folded, config, tensors, quant.get("state", {}), example)
    return QuantizedModel(runtime, config, source, tensors, state, static_build=static)
