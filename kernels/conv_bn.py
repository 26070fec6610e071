"""The unified Conv2d + BatchNorm2d (+ activation) operator: one module for training and inference.

Training uses a custom autograd Function whose forward is conv -> batch statistics -> BN-apply + activation
(one fused epilogue, kernels/bn_act.py) and which saves far less than the eager chain for backward:
  - `lean`: saves the conv input and the per-channel statistics; backward recomputes the conv output.
  - `fast`: saves the conv input and the conv output; backward recomputes only z = BN-apply(y) (one FMA/elt).
The eager chain saves the conv input, the conv output (for BN) and the activation output (for ReLU).
Inference (`eval()` with running statistics) folds BN into the conv weight and bias: one conv + activation.
The folded weights are cached and refreshed whenever a parameter or running statistic changes (checked through
tensor version counters, so an optimizer step or `load_state_dict` is never served stale; cf. pytorch#108863).

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

from kernels.activations import Activation, get_activation
from kernels.bn_act import bn_act_backward, bn_act_train_forward

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


class _ConvBNActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, running_mean, running_var, momentum, eps, spec, act, lean):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            y = spec.conv(xc, wc, bc)  # (B, C, H, W)
            # mean, invstd: (C,) batch statistics; running stats updated in place when given
            out, mean, invstd = bn_act_train_forward(
                y, gamma, beta, running_mean, running_var, momentum, eps, act
            )
        saved_y = None if lean else y
        ctx.save_for_backward(xc, wc, bc, gamma, beta, mean, invstd, saved_y)
        ctx.spec, ctx.act, ctx.lean = spec, act, lean
        ctx.in_dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*(t for t in (running_mean, running_var) if t is not None))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out):
        xc, wc, bc, gamma, beta, mean, invstd, y = ctx.saved_tensors
        spec: _ConvSpec = ctx.spec
        if ctx.lean:
            y = spec.conv(xc, wc, bc)  # recompute: bitwise the forward's y (same inputs, same kernel)
        g_y, g_gamma, g_beta = bn_act_backward(g_out.to(y.dtype), y, gamma, beta, mean, invstd, ctx.act)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g_x, g_w, g_b = torch.ops.aten.convolution_backward(
            g_y.to(y.dtype),
            xc,
            wc,
            None if bc is None else [bc.shape[0]],
            list(spec.stride),
            list(spec.padding),
            list(spec.dilation),
            False,
            [0, 0],
            spec.groups,
            [need_x, need_w, need_b and bc is not None],
        )
        x_dtype, w_dtype, b_dtype = ctx.in_dtypes
        g_x = None if g_x is None else g_x.to(x_dtype)
        g_w = None if g_w is None else g_w.to(w_dtype)
        g_b = None if g_b is None else g_b.to(b_dtype)
        g_gamma = g_gamma.to(gamma.dtype) if ctx.needs_input_grad[3] else None
        g_beta = g_beta.to(beta.dtype) if ctx.needs_input_grad[4] else None
        return g_x, g_w, g_b, g_gamma, g_beta, None, None, None, None, None, None, None


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
    return torch.ones(c, device=like.device, dtype=like.dtype), torch.zeros(
        c, device=like.device, dtype=like.dtype
    )


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
        return act.forward(spec.conv(x, w, b))
    c = weight.shape[0]
    if bn_weight is None or bn_bias is None:
        ones, zeros = _ones_zeros(c, weight if weight.dtype == torch.float64 else weight.float())
        bn_weight = ones if bn_weight is None else bn_weight
        bn_bias = zeros if bn_bias is None else bn_bias
    lean = SaveMode.parse(save) is SaveMode.LEAN
    return _ConvBNActFunction.apply(
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum, eps, spec, act, lean
    )


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
        bn = nn.BatchNorm2d(
            out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
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

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w', b') of the eval-mode folded conv; cached until a parameter or running statistic changes.
        Differentiable (and then not cached) when grad is enabled and parameters require grad."""
        bn, conv = self.bn, self.conv
        args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
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
        if not self.training and bn.track_running_stats:
            w, b = self.folded()
            return self.act.forward(spec.conv(x, w, b))
        update = self.training and bn.track_running_stats and not _FREEZE_STATS.get()
        return conv_bn_act(
            x,
            conv.weight,
            conv.bias,
            bn.weight,
            bn.bias,
            bn.running_mean if update else None,
            bn.running_var if update else None,
            training=True,
            momentum=self._momentum() if update else 0.0,
            eps=bn.eps,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            act=self.act,
            save=self.save,
        )
