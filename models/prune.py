"""Structured L1 channel pruning that physically shrinks the layers of a `models.cnn.CNN`.

A *channel group* is a set of channels that must be removed together:
  - its producers: the `ConvBNAct` ops whose output channels ARE the group (conv weight rows, conv bias, BN
    gamma/beta, running mean/var are all sliced);
  - its consumers: the ops reading those channels (conv weight columns / `nn.Linear` weight columns are
    sliced).
Inside a residual block, conv1's outputs are a group of their own (producer conv1, consumer conv2).
Channels that meet in a residual add are tied: `conv2(..) + shortcut(x)` makes conv2 and a ConvBNAct
shortcut one group, and an identity shortcut ties the block's output to its input, so the stem and every
identity block of a stage share one group (all their producers are sliced with the same indices; every conv
reading the stream is a consumer).
`PruneConfig(residual=False)` leaves those tied groups alone and prunes only the block-internal ones.

Score of a channel: the L1 norm of its BN-folded filter (w * gamma / sqrt(var + eps)), i.e. what actually
reaches the output in inference (Li et al., "Pruning Filters for Efficient ConvNets", 2017, with BN folded
in); in a tied group, each producer's scores are divided by their mean before summing, so no single layer
dominates.

Gradual schedule: step k of n keeps round(C0 * (1 - ratio * k / n)) channels of each group (C0 = the count
before the first step), with the caller's fine-tuning between steps (`finetune(model, step)`).

`prune_` understands the `CNN` layout of models/cnn.py; any other model goes through `prune_traced_`, which
traces the channel groups with Torch-Pruning's dependency graph on a plain Conv -> BN -> act view of each
`ConvBNAct` (whose custom autograd op Torch-Pruning cannot see through), and records the resulting layer shapes
(`module_shapes`) so that an artifact can rebuild the pruned model (`apply_module_shapes_`).
After pruning, the layers hold new Parameter objects: build the optimizer afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct
from models.cnn import CNN, BasicBlock
from models.macs import count_macs, count_params


@dataclass(kw_only=True, slots=True)
class PruneConfig:
    """How much to prune and how."""

    ratio: float = 0.2
    """Fraction of each group's channels removed at the end of the schedule, in [0, 0.9]."""
    steps: int = 1
    """Number of pruning steps that reach `ratio` gradually (fine-tuning between them)."""
    residual: bool = True
    """Also prune channel groups tied through residual adds (jointly); False leaves them alone."""
    min_channels: int = 1
    """Never keep fewer channels than this in a group."""

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, int | float) or not 0.0 <= self.ratio <= 0.9:
            raise ValueError(f"ratio must be a number in [0, 0.9], got {self.ratio!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise ValueError(f"min_channels must be a positive int, got {self.min_channels!r}")
        if not isinstance(self.residual, bool):
            raise TypeError(f"residual must be a bool, got {type(self.residual).__name__}")


@dataclass(slots=True)
class ChannelGroup:
    """Channels removed together (see module docstring); names are qualified module names in the model."""

    producers: list[str]
    consumers: list[str] = field(default_factory=list)
    residual: bool = False
    """True when the channels are tied through a residual add."""


@dataclass(slots=True)
class PruneReport:
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: dict[str, int]
    """Output channels of every ConvBNAct after pruning, by qualified name."""

    def to_dict(self) -> dict:
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "channels": dict(self.channels),
        }


def channel_groups(model: nn.Module) -> list[ChannelGroup]:
    """The channel groups of a `CNN`, in network order."""
    if not isinstance(model, CNN):
        raise TypeError(f"model must be a models.cnn.CNN (other layouts are not traced), got {type(model).__name__}")
    stream = ChannelGroup(producers=["stem"])  # the channels flowing along the residual path
    groups: list[ChannelGroup] = []
    for i, block in enumerate(model.blocks):
        if not isinstance(block, BasicBlock):
            raise TypeError(f"blocks.{i} must be a BasicBlock, got {type(block).__name__}")
        p = f"blocks.{i}"
        stream.consumers.append(f"{p}.conv1")
        groups.append(ChannelGroup(producers=[f"{p}.conv1"], consumers=[f"{p}.conv2"]))
        if isinstance(block.shortcut, ConvBNAct):
            stream.consumers.append(f"{p}.shortcut")
            groups.append(stream)
            stream = ChannelGroup(producers=[f"{p}.conv2", f"{p}.shortcut"], residual=True)
        else:  # identity shortcut: conv2's output is added to the stream itself
            stream.producers.append(f"{p}.conv2")
            stream.residual = True
    stream.consumers.append("head")
    groups.append(stream)
    return groups


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels of every ConvBNAct (what an artifact records to rebuild a pruned model)."""
    return {name: m.conv.out_channels for name, m in model.named_modules() if isinstance(m, ConvBNAct)}


def _group_size(model: nn.Module, group: ChannelGroup) -> int:
    sizes = {model.get_submodule(n).conv.out_channels for n in group.producers}
    assert len(sizes) == 1, f"producers of a group disagree on channels: {group.producers} -> {sizes}"
    return sizes.pop()


@torch.no_grad()
def l1_scores(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """(C,) importance of each channel of `group`: sum over producers of the normalized folded-filter L1."""
    total = None
    for name in group.producers:
        op: ConvBNAct = model.get_submodule(name)
        bn = op.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.abs()
        s = op.conv.weight.abs().flatten(1).sum(1) * scale  # (C,)
        s = s / s.mean().clamp_min(1e-12)
        total = s if total is None else total + s
    return total


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


@torch.no_grad()
def _shrink_outputs(op: ConvBNAct, keep: torch.Tensor) -> None:
    conv, bn = op.conv, op.bn
    if conv.groups != 1:
        raise ValueError(f"pruning grouped convs is not supported (groups={conv.groups})")
    conv.weight = _param(conv.weight[keep], conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[keep], conv.bias)
    conv.out_channels = len(keep)
    if bn.weight is not None:
        bn.weight = _param(bn.weight[keep], bn.weight)
        bn.bias = _param(bn.bias[keep], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = len(keep)
    op._folded = None


@torch.no_grad()
def _shrink_inputs(module: nn.Module, keep: torch.Tensor) -> None:
    if isinstance(module, ConvBNAct):
        conv = module.conv
        if conv.groups != 1:
            raise ValueError(f"pruning grouped convs is not supported (groups={conv.groups})")
        conv.weight = _param(conv.weight[:, keep], conv.weight)
        conv.in_channels = len(keep)
        module._folded = None
    elif isinstance(module, nn.Linear):
        module.weight = _param(module.weight[:, keep], module.weight)
        module.in_features = len(keep)
    else:
        raise TypeError(f"cannot shrink the inputs of {type(module).__name__}")


def _apply_keep(model: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> None:
    for name in group.producers:
        _shrink_outputs(model.get_submodule(name), keep)
    for name in group.consumers:
        _shrink_inputs(model.get_submodule(name), keep)


def prune_group_(model: nn.Module, group: ChannelGroup, n_keep: int) -> torch.Tensor:
    """Keeps the `n_keep` channels of `group` with the largest L1 score (in their original order)."""
    c = _group_size(model, group)
    if not 1 <= n_keep <= c:
        raise ValueError(f"n_keep must be in [1, {c}], got {n_keep}")
    keep = torch.topk(l1_scores(model, group), n_keep).indices.sort().values
    if n_keep < c:
        _apply_keep(model, group, keep)
    return keep


def _targets(model: nn.Module, cfg: PruneConfig) -> list[tuple[ChannelGroup, int]]:
    return [(g, _group_size(model, g)) for g in channel_groups(model) if cfg.residual or not g.residual]


def prune_(
    model: nn.Module,
    cfg: PruneConfig,
    *,
    input_shape: tuple[int, int, int],
    finetune: Callable[[nn.Module, int], None] | None = None,
) -> PruneReport:
    """Prunes `model` in place to `cfg.ratio` over `cfg.steps` steps, calling `finetune(model, step)` after
    each step (step = 1..steps). `input_shape` (C, H, W) is used to count MACs. Returns the counts. A model
    other than a `CNN` is pruned by `prune_traced_` (its report also holds the layer shapes)."""
    if not isinstance(model, CNN):
        return prune_traced_(model, cfg, input_shape=input_shape, finetune=finetune)
    params0, macs0 = count_params(model), count_macs(model, input_shape)
    targets = _targets(model, cfg)
    for step in range(1, cfg.steps + 1):
        frac = cfg.ratio * step / cfg.steps
        for group, c0 in targets:
            # min(): a schedule never grows a group back
            n_keep = min(keep_count(c0, frac, cfg.min_channels), _group_size(model, group))
            prune_group_(model, group, n_keep)
        if finetune is not None:
            finetune(model, step)
    macs1 = count_macs(model, input_shape)
    return PruneReport(params0, count_params(model), macs0, macs1, channel_counts(model))


def resize_(model: nn.Module, channels: dict[str, int]) -> nn.Module:
    """Shrinks a freshly built `CNN` to the recorded `channels` (from `channel_counts`) so that a pruned
    state_dict loads into it; the kept values are placeholders to be overwritten. Returns `model`."""
    have = channel_counts(model)
    if set(channels) != set(have):
        raise ValueError(f"channels must name exactly the model's ConvBNAct ops {sorted(have)}, got {sorted(channels)}")
    for group in channel_groups(model):
        want = {channels[n] for n in group.producers}
        if len(want) != 1:
            raise ValueError(f"tied producers {group.producers} must have equal channels, got {sorted(want)}")
        n = want.pop()
        c = _group_size(model, group)
        if not isinstance(n, int) or not 1 <= n <= c:
            raise ValueError(f"channels of {group.producers} must be an int in [1, {c}], got {n!r}")
        if n < c:
            _apply_keep(model, group, torch.arange(n))
    return model


def keep_count(c0: int, ratio: float, min_channels: int = 1) -> int:
    """Channels a group of `c0` keeps at `ratio` (the rounding prune_ uses)."""
    return max(min(min_channels, c0), round(c0 * (1.0 - ratio)))


# ------------------------------------------------------------------------------------- any traceable model


class _Unfused(nn.Module):
    """Conv -> BN -> act of a `ConvBNAct` as plain module calls on the SAME conv and bn modules.

    Torch-Pruning (DepGraph, Fang et al., CVPR 2023) finds coupled channels by walking the autograd graph of a
    forward pass; `ConvBNAct`'s custom autograd Function is one opaque node there, so its conv and BN (and every
    residual add or concat behind it) would look unconnected. Pruning runs on this view instead: the op's conv
    and bn are shrunk in place and the op, put back, computes with them."""

    def __init__(self, op: ConvBNAct):
        super().__init__()
        self.conv, self.bn = op.conv, op.bn
        self.act = ConvBNAct.activation_module(op.act.name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _output_layer(model: nn.Module, example: torch.Tensor) -> nn.Module | None:
    """The layer producing the logits (last nn.Linear or Conv2d run): its outputs are the classes, never pruned."""
    last: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, a, o: last.append(mod)) for m in model.modules()
             if isinstance(m, nn.Linear | nn.Conv2d)]  # fmt: skip
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return last[-1] if last else None


def module_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel geometry of every Conv2d, BatchNorm2d and Linear (ConvBNAct's included), by qualified name: what
    an artifact records to rebuild a pruned user model (`apply_module_shapes_`)."""
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = {"out": m.num_features}
        elif isinstance(m, nn.Linear):
            out[name] = {"in": m.in_features, "out": m.out_features}
    return out


@torch.no_grad()
def apply_module_shapes_(model: nn.Module, shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Shrinks the layers of a freshly built model to the recorded `shapes` (placeholder values, to be
    overwritten by load_state_dict). Raises ValueError when the recorded layers are not the model's."""
    have = module_shapes(model)
    if set(have) != set(shapes):
        odd = sorted(set(have) ^ set(shapes))[:6]
        raise ValueError(f"recorded layer shapes must name exactly the model's conv/BN/linear layers; differ: {odd}")
    for name, want in shapes.items():
        m = model.get_submodule(name)
        if want == have[name]:
            continue
        if isinstance(m, nn.Conv2d):
            cin, cout, g = int(want["in"]), int(want["out"]), int(want["groups"])
            if g < 1 or cin % g or cout % g:
                raise ValueError(f"{name}: in/out channels {cin}/{cout} must be multiples of groups {g}")
            m.weight = nn.Parameter(m.weight.new_zeros(cout, cin // g, *m.kernel_size), m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_zeros(cout), m.bias.requires_grad)
            m.in_channels, m.out_channels, m.groups = cin, cout, g
        elif isinstance(m, nn.BatchNorm2d):
            c = int(want["out"])
            if m.weight is not None:
                m.weight = nn.Parameter(m.weight.new_ones(c), m.weight.requires_grad)
                m.bias = nn.Parameter(m.bias.new_zeros(c), m.bias.requires_grad)
            if m.running_mean is not None:
                m.running_mean, m.running_var = m.running_mean.new_zeros(c), m.running_var.new_ones(c)
            m.num_features = c
        else:
            cin, cout = int(want["in"]), int(want["out"])
            m.weight = nn.Parameter(m.weight.new_zeros(cout, cin), m.weight.requires_grad)
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.new_zeros(cout), m.bias.requires_grad)
            m.in_features, m.out_features = cin, cout
    for m in model.modules():
        if isinstance(m, ConvBNAct):
            m._folded = None
    return model


@dataclass(slots=True)
class GraphPruneReport(PruneReport):
    """`PruneReport` of a traced model, with the layers left as they were."""

    shapes: dict[str, dict[str, int]] = field(default_factory=dict)
    """`module_shapes` after pruning (the plan an artifact records)."""
    unpruned: list[str] = field(default_factory=list)
    """Conv layers whose output channels were not pruned (the output layer, ungroupable ones)."""

    def to_dict(self) -> dict:
        return {**PruneReport.to_dict(self), "shapes": self.shapes, "unpruned": list(self.unpruned)}


def prune_traced_(
    model: nn.Module,
    cfg: PruneConfig,
    *,
    input_shape: tuple[int, int, int],
    finetune: Callable[[nn.Module, int], None] | None = None,
) -> GraphPruneReport:
    """Prunes any fx/autograd-traceable CNN (a user model after `fuse_`) in place with Torch-Pruning's dependency
    graph: channels coupled through residual adds, concatenation, depthwise/grouped convs, BN and the Linear head
    are removed together, by group L1 magnitude, `cfg.steps` steps with `finetune(model, step)` after each. The
    output layer keeps its classes. The forward is checked afterwards (same output shape, finite values)."""
    import torch_pruning as tp

    if cfg.min_channels != 1 or not cfg.residual:
        raise ValueError("prune_traced_ supports min_channels=1 and residual=True only (Torch-Pruning groups them)")
    example = torch.rand(2, *input_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        want = model(example).shape
    params0, macs0 = count_params(model), count_macs(model, input_shape)
    before = module_shapes(model)
    ops = [(n, m) for n, m in model.named_modules() if isinstance(m, ConvBNAct)]
    for name, op in ops:
        _set_submodule(model, name, _Unfused(op))
    try:
        head = _output_layer(model, example)
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=cfg.ratio,
            iterative_steps=cfg.steps,
            ignored_layers=[head] if head is not None else [],
        )
        for step in range(1, cfg.steps + 1):
            pruner.step()
            if finetune is not None:
                for name, op in ops:
                    op._folded = None
                    _set_submodule(model, name, op)
                finetune(model, step)
                for name, op in ops:
                    _set_submodule(model, name, _Unfused(op))
    finally:
        for name, op in ops:
            op._folded = None
            _set_submodule(model, name, op)
    model.eval()
    with torch.no_grad():
        out = model(example)
    if out.shape != want or not torch.isfinite(out).all():
        raise RuntimeError(
            f"pruning broke the model: output {tuple(out.shape)} (finite: {bool(torch.isfinite(out).all())}), "
            f"expected {tuple(want)}"
        )
    model.train(was_training)
    after = module_shapes(model)
    unpruned = [n for n, s in after.items() if "groups" in s and s["out"] == before[n]["out"]]
    return GraphPruneReport(
        params0, count_params(model), macs0, count_macs(model, input_shape), channel_counts(model),
        shapes=after, unpruned=unpruned,
    )  # fmt: skip
