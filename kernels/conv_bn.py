"""The unified Conv2d + BatchNorm2d (+ activation) operator: one module for training and inference.

Training uses custom autograd Functions, conv -> batch statistics -> BN-apply + activation (one fused epilogue,
kernels/bn_act.py), which save far less than the eager chain for backward:
  - `lean`: saves the conv input and the per-channel statistics; backward recomputes the conv output.
  - `fast`: the conv is autograd's own node (saves the conv input); the BN + activation Function saves the conv
    output and the statistics; backward recomputes only z = BN-apply(y) (one FMA/elt; not at all for act='none').
The eager chain saves the conv input, the conv output (for BN) and the activation output (for ReLU).
Inference (`eval()` with running statistics) folds BN into the conv weight and bias: one conv + activation.
The folded weights are cached and refreshed whenever a parameter or running statistic changes (checked through
tensor version counters, so an optimizer step or `load_state_dict` is never served stale; cf. pytorch#108863).

Layout: on the CPU the conv weight is channels_last and activations enter the conv channels_last (except small
maps with many channels: _NCHW_MIN_CHANNELS), oneDNN's native layout; outputs are equal, only strides differ from NCHW.

torch.compile (fullgraph, train and eval): `lean` traces as the custom op `tandem::conv_bn_act_lean` (fake kernel,
registered autograd whose backward recomputes the conv), `fast` as plain aten ops that inductor fuses (except a
small-map conv: the custom op `tandem::conv2d_nchw`, so it stays NCHW), eval as the folded conv (constants under
inductor's freezing). Eager calls keep the autograd.Functions below (less per-call
dispatch than a custom op).

Mixed precision: under autocast the conv runs in the autocast dtype (inputs cast once, here, explicitly), the
statistics in fp32, and the backward recompute uses the same cast tensors, so it reproduces the forward bit for bit.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.activations import BY_CODE, Activation, get_activation
from kernels.bn_act import bn_act_backward, bn_act_train_forward
from kernels.bn_stats import stat_dtype

_FREEZE_STATS = contextvars.ContextVar("tandem_freeze_running_stats", default=False)


@contextlib.contextmanager
def frozen_running_stats():
    """Inside, training-mode ConvBNAct uses batch statistics but leaves running statistics and
    num_batches_tracked alone: for the recompute pass of activation checkpointing, which would otherwise
    update them a second time."""
    token = _FREEZE_STATS.set(True)
    try:
        yield
    finally:
        _FREEZE_STATS.reset(token)


class SaveMode(str, enum.Enum):
    """What the training op keeps for backward."""

    LEAN = "lean"
    """Conv input + per-channel stats; the conv is recomputed in backward (least memory)."""
    FAST = "fast"
    """Conv input + conv output; only the elementwise BN/activation part is recomputed."""

    @classmethod
    def parse(cls, value: str | SaveMode) -> SaveMode:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"save mode must be one of {[m.value for m in cls]}, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class _ConvSpec:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_CL_MIN_PIXELS = 16
"""The inference forms' layout rule (models/fuse.py, which times the other layout too): channels_last for inputs
of at least this many pixels."""

_SMALL_MAP_PIXELS = 16
"""Training (and ConvBNAct's own eval forward): a map of at most this many pixels (4x4) is small, see
_NCHW_MIN_CHANNELS."""

_NCHW_MIN_CHANNELS = 256
"""A small map with at least this many input channels runs NCHW, everything else channels_last. Measured here
(conv forward + backward, batch 64, 1 thread, channels_last time / NCHW time): 3x3 convs on 1x1, 2x2 and 4x4 maps
1.33-1.71 at 256-512 channels, but 0.89-0.98 at 16-128 channels; on 6x6 maps 1.03 at 256, on 8x8 0.86-0.90 at
16-256. The old pixel-only rule (NCHW under 16 pixels) kept resnet18 32x32's stage 4 (4x4, 512 channels)
channels_last and ran small 8x8's 2x2 64-channel maps NCHW, both the slower layout."""


def _cl_wanted(x: torch.Tensor) -> bool:
    """Whether a conv input runs channels_last (CPU, oneDNN dtypes): unless its map is small and wide."""
    if x.device.type != "cpu" or x.dtype not in _ONEDNN_DTYPES:
        return False
    return x.shape[-1] * x.shape[-2] > _SMALL_MAP_PIXELS or x.shape[1] < _NCHW_MIN_CHANNELS


def _nchw_small_map(x: torch.Tensor) -> bool:
    """A CPU oneDNN-dtype input that `_cpu_layout` keeps NCHW (small, wide maps: _NCHW_MIN_CHANNELS)."""
    return x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and not _cl_wanted(x)


def _cpu_layout(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, weight) laid out for the conv. On the CPU: channels_last input (oneDNN's native conv layout; an NCHW
    conv pays a reorder to and from a blocked layout on every call: measured here 1.2-1.8x slower for conv forward
    and backward at 16-128 channels, 8x8-32x32, 1 thread), a no-op for an input already in it, so only a model's
    first op converts. Small wide maps (_NCHW_MIN_CHANNELS) run NCHW, input and weight (a differentiable copy of
    the channels_last weight: far cheaper than oneDNN's channels_last kernels there). Values are unchanged;
    non-oneDNN dtypes (float64: aten's reference conv) and other devices are left as they are."""
    if x.device.type != "cpu" or x.dtype not in _ONEDNN_DTYPES:
        return x, weight
    if _cl_wanted(x):
        return x.contiguous(memory_format=torch.channels_last), weight
    return x.contiguous(), weight.contiguous()


def _match_weight_layout(w: torch.Tensor, x: torch.Tensor) -> None:
    """Puts a CPU conv weight in the layout of its (already laid out) input: a channels_last weight makes oneDNN
    pick channels_last kernels even for an NCHW input. Changes `w.data` only, on the rare call whose layout
    differs from the weight's (the first forward of a small-map layer); values and the Parameter stay.
    For frozen inference weights only (models.fuse.FoldedConvAct): a trained weight must not change storage
    after DDP or an optimizer took it (see ConvBNAct._weight_layout)."""
    if w.device.type != "cpu" or w.dtype not in _ONEDNN_DTYPES or w.dim() != 4:
        return
    fmt = torch.channels_last if _cl_wanted(x) else torch.contiguous_format
    if not w.is_contiguous(memory_format=fmt):
        with torch.no_grad():
            w.data = w.data.contiguous(memory_format=fmt)


def _dense_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format a custom op's output takes for input `t`: the same rule in the real and the fake kernel,
    so the strides inductor plans with are the strides it gets."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class _BNActFunction(torch.autograd.Function):
    """BN (batch statistics) + activation over a conv output y computed outside, by autograd's own conv node:
    the `fast` mode. Saves y and the statistics; the conv node saves its input. Nothing else is kept."""

    @staticmethod
    def forward(ctx, y, gamma, beta, running_mean, running_var, momentum, eps, act):
        out, mean, invstd = bn_act_train_forward(y, gamma, beta, running_mean, running_var, momentum, eps, act)
        ctx.save_for_backward(y, gamma, beta, mean, invstd)
        ctx.act = act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        y, gamma, beta, mean, invstd = ctx.saved_tensors
        g_y, g_gamma, g_beta = bn_act_backward(g_out.to(y.dtype), y, gamma, beta, mean, invstd, ctx.act)
        g_gamma = g_gamma.to(gamma.dtype) if ctx.needs_input_grad[1] else None
        g_beta = g_beta.to(beta.dtype) if ctx.needs_input_grad[2] else None
        return g_y, g_gamma, g_beta, None, None, None, None, None


def _lean_forward(xc, wc, bc, gamma, beta, running_mean, running_var, momentum, eps, spec, act):
    y = spec.conv(xc, wc, bc)  # (B, C, H, W)
    # mean, invstd: (C,) batch statistics; running stats updated in place when given
    return bn_act_train_forward(y, gamma, beta, running_mean, running_var, momentum, eps, act)


def _lean_backward(g_out, xc, wc, bc, gamma, beta, mean, invstd, spec, act, need):
    """(g_x, g_w, g_b, g_gamma, g_beta) of the lean op; `need` = which of (x, w, b) want a gradient."""
    y = spec.conv(xc, wc, bc)  # recompute: bitwise the forward's y (same inputs, same kernel)
    g_y, g_gamma, g_beta = bn_act_backward(g_out.to(y.dtype), y, gamma, beta, mean, invstd, act)
    del y
    g_x, g_w, g_b = torch.ops.aten.convolution_backward(
        g_y,
        xc,
        wc,
        None if bc is None else [bc.shape[0]],
        list(spec.stride),
        list(spec.padding),
        list(spec.dilation),
        False,
        [0, 0],
        spec.groups,
        [need[0], need[1], need[2] and bc is not None],
    )
    return g_x, None if g_w is None else _strided_like(g_w, wc.stride()), g_b, g_gamma, g_beta


def _strided_like(g: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """`g` with the weight's `stride` where the two differ only on size-1 dims (the same memory, values unchanged):
    a 1x1 kernel is contiguous in both formats, and its gradient comes back with the strides of the format the
    conv ran in, which DDP compares with the parameter's ("Grad strides do not match bucket view strides" on
    every run, and a copy of that gradient into its bucket on every step)."""
    if g.stride() == stride or any(n > 1 and a != b for n, a, b in zip(g.shape, g.stride(), stride, strict=True)):
        return g
    return g.as_strided(g.shape, stride)


class _ConvBNActFunction(torch.autograd.Function):
    """The `lean` mode: conv + BN + activation; saves the conv input and the statistics, recomputes the conv."""

    @staticmethod
    def forward(ctx, xc, wc, bc, gamma, beta, running_mean, running_var, momentum, eps, spec, act):
        out, mean, invstd = _lean_forward(xc, wc, bc, gamma, beta, running_mean, running_var, momentum, eps, spec, act)
        ctx.save_for_backward(xc, wc, bc, gamma, beta, mean, invstd)
        ctx.spec, ctx.act = spec, act
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        xc, wc, bc, gamma, beta, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_x, g_w, g_b, g_gamma, g_beta = _lean_backward(
            g_out, xc, wc, bc, gamma, beta, mean, invstd, ctx.spec, ctx.act, need[:3]
        )
        g_gamma = g_gamma.to(gamma.dtype) if need[3] else None
        g_beta = g_beta.to(beta.dtype) if need[4] else None
        return g_x, g_w, g_b, g_gamma, g_beta, None, None, None, None, None, None


# ---- torch.library custom op: the lean op in a form torch.compile traces (fullgraph) ----------------------------
# Eager calls go through the autograd.Functions above (a custom op's dispatch costs tens of microseconds per
# call, which a small model's step notices). Under torch.compile, `lean` is this custom op: its fake kernel gives
# inductor shapes, dtypes and strides, its registered autograd the backward that recomputes the conv, so the
# memory saving holds compiled too. `fast` compiles as plain aten ops (see `_train`): inductor fuses those.
_Opt = torch.Tensor | None


def _stats_copy(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _stats_out(rm: torch.Tensor | None, rv: torch.Tensor | None, like: torch.Tensor):
    empty = like.new_empty(0, dtype=torch.float32)
    return (empty, empty.clone()) if rm is None else (rm, rv)


def _update_running(running_mean, running_var, new_mean, new_var) -> None:
    if running_mean is not None:
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)


@torch.library.custom_op("tandem::conv_bn_act_lean", mutates_args=())
def _lean_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: _Opt,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    running_mean: _Opt,
    running_var: _Opt,
    momentum: float,
    eps: float,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, mean, invstd, new running mean, new running var); the last two are empty without running stats.
    Functional (an op with registered autograd may not mutate its inputs): the caller copies them in."""
    spec = _ConvSpec(tuple(stride), tuple(padding), tuple(dilation), groups)
    rm, rv = _stats_copy(running_mean), _stats_copy(running_var)
    out, mean, invstd = _lean_forward(x, weight, bias, gamma, beta, rm, rv, momentum, eps, spec, BY_CODE[act])
    return out.contiguous(memory_format=_dense_format(x)), mean, invstd, *_stats_out(rm, rv, x)


@_lean_op.register_fake
def _(x, weight, bias, gamma, beta, running_mean, running_var, momentum, eps, stride, padding, dilation, groups, act):
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)  # fake tensors: shape only
    c, sd = y.shape[1], stat_dtype(y.dtype)
    out = torch.empty_like(y, memory_format=_dense_format(x))
    rm, rv = _stats_copy(running_mean), _stats_copy(running_var)
    return out, y.new_empty(c, dtype=sd), y.new_empty(c, dtype=sd), *_stats_out(rm, rv, x)


@torch.library.custom_op("tandem::conv_bn_act_lean_backward", mutates_args=())
def _lean_backward_op(
    g_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: _Opt,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All five gradients (bias: zeros(0) when there is none); a custom op cannot return None."""
    spec = _ConvSpec(tuple(stride), tuple(padding), tuple(dilation), groups)
    g_x, g_w, g_b, g_gamma, g_beta = _lean_backward(
        g_out, x, weight, bias, gamma, beta, mean, invstd, spec, BY_CODE[act], (True, True, bias is not None)
    )
    g_b = weight.new_zeros(0) if g_b is None else g_b
    return (
        g_x.contiguous(memory_format=_dense_format(x)),
        g_w.contiguous(),
        g_b,
        g_gamma.to(gamma.dtype),
        g_beta.to(beta.dtype),
    )


@_lean_backward_op.register_fake
def _(g_out, x, weight, bias, gamma, beta, mean, invstd, stride, padding, dilation, groups, act):
    g_b = weight.new_empty(0) if bias is None else torch.empty_like(bias)
    return (
        torch.empty_like(x, memory_format=_dense_format(x)),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        g_b,
        torch.empty_like(gamma),
        torch.empty_like(beta),
    )


def _lean_setup(ctx, inputs, output):
    x, weight, bias, gamma, beta, _, _, _, _, stride, padding, dilation, groups, act = inputs
    _, mean, invstd, _, _ = output
    ctx.save_for_backward(x, weight, bias, gamma, beta, mean, invstd)
    ctx.conv_args = (stride, padding, dilation, groups, act)


def _lean_grad(ctx, g_out, *_):
    x, weight, bias, gamma, beta, mean, invstd = ctx.saved_tensors
    g_x, g_w, g_b, g_gamma, g_beta = torch.ops.tandem.conv_bn_act_lean_backward(
        g_out, x, weight, bias, gamma, beta, mean, invstd, *ctx.conv_args
    )
    return g_x, g_w, g_b if bias is not None else None, g_gamma, g_beta, *([None] * 9)


torch.library.register_autograd("tandem::conv_bn_act_lean", _lean_grad, setup_context=_lean_setup)


# ---- torch.library custom op: an NCHW conv that inductor cannot re-layout ---------------------------------------
# Inductor's CPU layout optimization (torch._inductor.graph.decide_layout_opt: always on with oneDNN) makes every
# aten convolution of a graph channels_last, input and weight (copying an NCHW weight on every call). On small maps
# that is the slow layout (see _NCHW_MIN_CHANNELS), so under torch.compile the `fast` form runs its small-map convs
# through this op: inductor sees an opaque call on NCHW tensors and still fuses the BN and activation around it.
@torch.library.custom_op("tandem::conv2d_nchw", mutates_args=())
def _conv_nchw_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: _Opt,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """F.conv2d on NCHW input and weight; NCHW output."""
    return F.conv2d(x.contiguous(), weight.contiguous(), bias, stride, padding, dilation, groups).contiguous()


@_conv_nchw_op.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups).contiguous()  # fake tensors: shape only


@torch.library.custom_op("tandem::conv2d_nchw_backward", mutates_args=())
def _conv_nchw_backward_op(
    g_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_x, g_w, g_b) of `conv2d_nchw`, all NCHW (g_b: zeros(0) without a bias; a custom op cannot return None)."""
    g_x, g_w, g_b = torch.ops.aten.convolution_backward(
        g_out.contiguous(), x.contiguous(), weight.contiguous(), [weight.shape[0]] if has_bias else None,
        stride, padding, dilation, False, [0, 0], groups, [True, True, has_bias],
    )  # fmt: skip
    return g_x.contiguous(), g_w.contiguous(), weight.new_zeros(0) if g_b is None else g_b


@_conv_nchw_backward_op.register_fake
def _(g_out, x, weight, has_bias, stride, padding, dilation, groups):
    g_b = weight.new_empty(weight.shape[0] if has_bias else 0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        weight, memory_format=torch.contiguous_format
    ), g_b


def _conv_nchw_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.conv_args = (bias is not None, stride, padding, dilation, groups)


def _conv_nchw_grad(ctx, g_out):
    x, weight = ctx.saved_tensors
    g_x, g_w, g_b = torch.ops.tandem.conv2d_nchw_backward(g_out, x, weight, *ctx.conv_args)
    return g_x, g_w, g_b if ctx.conv_args[0] else None, None, None, None, None


torch.library.register_autograd("tandem::conv2d_nchw", _conv_nchw_grad, setup_context=_conv_nchw_setup)


def _train(x, weight, bias, gamma, beta, running_mean, running_var, momentum, eps, spec, act, lean):
    """Training-mode op on validated arguments: casts for autocast, picks the eager or the traceable form."""
    x, weight = _cpu_layout(x, weight)
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:  # the conv in the autocast dtype, cast once here; statistics in fp32
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    ctx = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
    with ctx:
        if torch.compiler.is_compiling():
            if lean:
                out, _, _, new_mean, new_var = torch.ops.tandem.conv_bn_act_lean(
                    x, weight, bias, gamma, beta, running_mean, running_var, momentum, eps,
                    list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups, act.code,
                )  # fmt: skip
                _update_running(running_mean, running_var, new_mean, new_var)
                return out
            # fast, compiled: plain aten ops, so inductor fuses the statistics, normalization and activation
            # (forward and backward) as it does for the eager chain; its partitioner picks what to save. Small
            # maps: the conv NCHW, as eager runs it (inductor would make an aten conv channels_last)
            if _nchw_small_map(x):
                y = torch.ops.tandem.conv2d_nchw(
                    x, weight, bias, list(spec.stride), list(spec.padding), list(spec.dilation), spec.groups
                )
            else:
                y = spec.conv(x, weight, bias)
            return act.forward(F.batch_norm(y, running_mean, running_var, gamma, beta, True, momentum, eps))
        if lean:
            return _ConvBNActFunction.apply(
                x, weight, bias, gamma, beta, running_mean, running_var, momentum, eps, spec, act
            )
        # fast: the conv is autograd's own node (it saves x); the Function saves y and the statistics
        if weight.shape[-2:] == (1, 1):
            weight = _GradStridedLike.apply(weight)
        return _BNActFunction.apply(
            spec.conv(x, weight, bias), gamma, beta, running_mean, running_var, momentum, eps, act
        )


class _GradStridedLike(torch.autograd.Function):
    """Identity whose backward gives the gradient its input's strides (`_strided_like`): for the 1x1 weights of
    the fast mode, whose gradient autograd's own conv node computes."""

    @staticmethod
    def forward(ctx, w):
        ctx.stride = w.stride()
        return w.view_as(w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return _strided_like(g, ctx.stride)


def fold_conv_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(conv(x)) in eval mode == conv(x; w', b') with w' = w * s, b' = (b - mean) * s + beta,
    s = gamma / sqrt(running_var + eps). Differentiable; returns (w', b')."""
    scale = torch.rsqrt(running_var + eps)
    if gamma is not None:
        scale = scale * gamma
    w = weight * scale.to(weight.dtype).view(-1, 1, 1, 1)
    b = -running_mean * scale if bias is None else (bias - running_mean) * scale
    if beta is not None:
        b = b + beta
    return w, b.to(weight.dtype)


def _ones_zeros(c: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(c, device=like.device, dtype=like.dtype), torch.zeros(c, device=like.device, dtype=like.dtype)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    act: str | Activation = "relu",
    save: str | SaveMode = SaveMode.LEAN,
) -> torch.Tensor:
    """Functional unified operator: act(batch_norm(conv2d(x))).

    `training=True` normalizes with batch statistics and, when running stats are given, updates them in place
    with `momentum` (the exponential factor; pass 1/num_batches for a cumulative average). `training=False` folds
    BN into the conv (needs running stats). Equal to F.conv2d -> F.batch_norm -> act in values and gradients.
    """
    act = act if isinstance(act, Activation) else get_activation(act)
    spec = _ConvSpec(_pair(stride), _pair(padding), _pair(dilation), groups)
    _check_input(x, weight, groups)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("eval mode needs running_mean and running_var (or pass training=True)")
        w, b = fold_conv_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return act.forward_(spec.conv(*_cpu_layout(x, w), b))  # the conv's output is ours: activation in place
    c = weight.shape[0]
    if bn_weight is None or bn_bias is None:
        ones, zeros = _ones_zeros(c, weight if weight.dtype == torch.float64 else weight.float())
        bn_weight = ones if bn_weight is None else bn_weight
        bn_bias = zeros if bn_bias is None else bn_bias
    lean = SaveMode.parse(save) is SaveMode.LEAN
    return _train(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, spec, act, lean)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_input(x: torch.Tensor, weight: torch.Tensor, groups: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    expected = weight.shape[1] * groups
    if x.shape[1] != expected:
        raise ValueError(f"input must have {expected} channels, got {x.shape[1]} (shape {tuple(x.shape)})")


@torch.no_grad()
def plan_weight_layouts_(model: nn.Module, example: torch.Tensor) -> int:
    """Lays out each `ConvBNAct`'s CPU weight for the maps it will see: runs `model` once in eval mode on two
    rows of `example` (N, C, H, W), marks the ops whose input runs NCHW (_NCHW_MIN_CHANNELS) `small_maps`
    (weight NCHW; without this each call copies the channels_last weight to NCHW and its gradient back:
    measured 12 ms of a 241 ms resnet18 8x8 training step for the forward copies alone) and the others
    channels_last. Call it before DDP or an optimizer take the parameters. Returns the number of small-map ops."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(f"example must be a (N, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    nchw: dict[ConvBNAct, bool] = {}

    def record(op, args):
        nchw[op] = _nchw_small_map(args[0])

    ops = [m for m in model.modules() if isinstance(m, ConvBNAct)]
    hooks = [op.register_forward_pre_hook(record) for op in ops]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(example[:2])
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags:
            m.training = flag
    for op in ops:
        op.small_maps = op in nchw and nchw[op]
        op._weight_layout()
    return sum(op.small_maps for op in ops)


def plan_save_modes_(model: nn.Module, example: torch.Tensor) -> int:
    """Recomputes the conv in backward only where that saves memory worth the time: each `lean` op whose conv
    output, at the batch of `example` (N, C, H, W), has no more elements than its weight is switched to `fast`
    (saves the conv output instead of recomputing it). The weight is saved for backward anyway, so there the
    recompute would cost a whole conv to drop under half of what the op already holds: the late, small-map
    stages (resnet18 32x32 at batch 64: stage 4, 4x4 maps, 0.5 M output elements against 2.4 M weight elements;
    at 8x8: stages 2-4), while the large early maps, where activations dominate memory, stay lean. Runs `model`
    once in eval mode on `example` under no_grad; call it before torch.compile. Returns the number of ops
    switched."""
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError(f"example must be a (N, C, H, W) tensor, got {getattr(example, 'shape', example)!r}")
    outputs: dict[ConvBNAct, int] = {}

    def record(op, args, out):
        outputs[op] = out.numel()

    ops = [m for m in model.modules() if isinstance(m, ConvBNAct) and m.save is SaveMode.LEAN]
    hooks = [op.register_forward_hook(record) for op in ops]
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in flags:
            m.training = flag
    switched = 0
    for op in ops:
        if op in outputs and _saves_output(op, outputs[op]):
            op.save = SaveMode.FAST
            switched += 1
    return switched


def _saves_output(op: ConvBNAct, output_numel: int) -> bool:
    """plan_save_modes_' rule: a conv output no larger than the weight (saved anyway) is kept, not recomputed."""
    return output_numel <= op.conv.weight.numel()


class SavePlan:
    """`plan_save_modes_` made by the first training step instead of a forward of its own: each lean op decides
    at its first forward in training mode with grad enabled, at the batch training really runs (a Ray Train
    worker's share of the global batch), then drops its hook; that first step runs lean, every later step the
    planned form. Builds that only serve inference (replicas, sweep trials) pay nothing. `switched`: ops that
    now save their conv output; `pending`: ops not yet planned."""

    def __init__(self, model: nn.Module):
        self.switched = 0
        self._hooks = {}
        for op in model.modules():
            if isinstance(op, ConvBNAct) and op.save is SaveMode.LEAN:
                self._hooks[op] = op.register_forward_hook(self._decide)

    @property
    def pending(self) -> int:
        return len(self._hooks)

    def _decide(self, op: ConvBNAct, args, out: torch.Tensor) -> None:
        if not (op.training and torch.is_grad_enabled()):
            return  # an evaluation's batch is not the training batch
        self._hooks.pop(op).remove()
        if _saves_output(op, out.numel()):
            op.save = SaveMode.FAST
            self.switched += 1


def plan_save_modes_on_first_step_(model: nn.Module) -> SavePlan:
    """Installs `SavePlan` on `model`'s lean ops (call it where training starts, before torch.compile)."""
    return SavePlan(model)


class ConvBNAct(nn.Module):
    """Conv2d -> BatchNorm2d -> activation as one operator (see module docstring).

    Parameters live in `self.conv` (an nn.Conv2d) and `self.bn` (an nn.BatchNorm2d), which only hold them: the
    forward never calls those modules. This keeps state_dict keys familiar, lets `fuse_` adopt a user's modules
    as they are, and lets pruning shrink them with ordinary tensor slicing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        act: str = "relu",
        save: str | SaveMode = SaveMode.LEAN,
        device=None,
        dtype=None,
    ):
        super().__init__()
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            device=device,
            dtype=dtype,
        )
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self._adopt(conv, bn, act, save)

    def _adopt(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str, save: str | SaveMode) -> None:
        if conv.padding_mode != "zeros":
            raise ValueError(f"conv padding_mode must be 'zeros', got {conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError(f"conv padding must be numeric, got {conv.padding!r}")
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"bn.num_features must equal conv.out_channels ({conv.out_channels}), got {bn.num_features}"
            )
        self.conv = conv
        self.bn = bn
        self.act = get_activation(act)
        self.save = SaveMode.parse(save)
        self._folded: tuple[tuple, torch.Tensor, torch.Tensor] | None = None
        self.small_maps = False
        """Its inputs run NCHW (small, wide maps; set by `plan_weight_layouts_`): the CPU weight stays NCHW,
        the layout those maps run in, so no call copies it."""
        self._weight_layout()

    def _weight_layout(self) -> None:
        """The conv weight channels_last on the CPU (with a channels_last input oneDNN then reorders nothing per
        call: conv forward measured 1.2-1.6x faster than with an NCHW weight), contiguous elsewhere (the Triton
        epilogue wants NCHW conv outputs, and a channels_last weight would make cuDNN write channels_last). Same
        Parameter object and values; run at construction and on `.to()`/`.cuda()`, never in forward: a weight
        whose storage changes after DDP wrapped the model trains wrongly (checked: DDP's reducer keeps the old)."""
        w = self.conv.weight
        cpu = w.device.type == "cpu" and w.dtype in _ONEDNN_DTYPES and w.dim() == 4
        fmt = torch.channels_last if cpu and not getattr(self, "small_maps", False) else torch.contiguous_format
        if not w.is_contiguous(memory_format=fmt):
            with torch.no_grad():
                w.data = w.data.contiguous(memory_format=fmt)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._weight_layout()
        return self

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: str = "none", save: str | SaveMode = SaveMode.LEAN
    ) -> ConvBNAct:
        """Adopts existing Conv2d/BatchNorm2d modules (their parameter objects are kept, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._adopt(conv, bn, act, save)
        return self

    @staticmethod
    def activation_module(act: str) -> nn.Module:
        """A standalone nn.Module for activation `act` (used after residual adds)."""
        a = get_activation(act)
        return nn.Identity() if a.module is None else a.module()

    def extra_repr(self) -> str:
        return f"act={self.act.name}, save={self.save.value}"

    def _momentum(self) -> float:
        bn = self.bn
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
        return bn.momentum

    def _fold_key(self) -> tuple:
        bn, conv = self.bn, self.conv
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        return (bn.eps,) + tuple(
            None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors
        )

    def _fold_args(self) -> tuple:
        bn, conv = self.bn, self.conv
        return conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w', b') of the eval-mode folded conv; cached until a parameter or running statistic changes.
        Differentiable (and then not cached) when grad is enabled and parameters require grad."""
        args = self._fold_args()
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return fold_conv_bn(*args)
        key = self._fold_key()
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, *fold_conv_bn(*args))
        return self._folded[1], self._folded[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        _check_input(x, conv.weight, conv.groups)
        spec = _ConvSpec(conv.stride, conv.padding, conv.dilation, conv.groups)
        compiling = torch.compiler.is_compiling()
        if not self.training and bn.track_running_stats:
            # compiled: fold in the graph (inductor's freezing turns it into constants); eager: the cached fold
            w, b = fold_conv_bn(*self._fold_args()) if compiling else self.folded()
            y = spec.conv(*_cpu_layout(x, w), b)
            # in place when nothing can need the pre-activation (it is ours, and no graph records it)
            return self.act.forward(y) if compiling or torch.is_grad_enabled() else self.act.forward_(y)
        freeze = False if compiling else _FREEZE_STATS.get()  # a context variable is not traceable
        update = self.training and bn.track_running_stats and not freeze
        gamma, beta = bn.weight, bn.bias
        if gamma is None or beta is None:
            ones, zeros = _ones_zeros(
                conv.out_channels, conv.weight if conv.weight.dtype == torch.float64 else conv.weight.float()
            )
            gamma = ones if gamma is None else gamma
            beta = zeros if beta is None else beta
        return _train(
            x,
            conv.weight,
            conv.bias,
            gamma,
            beta,
            bn.running_mean if update else None,
            bn.running_var if update else None,
            self._momentum() if update else 0.0,
            bn.eps,
            spec,
            self.act,
            self.save is SaveMode.LEAN,
        )
