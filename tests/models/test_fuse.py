"""fuse_: which chains become ConvBNAct, and the fused model computes what the original did (train, eval)."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.conv_bn import ConvBNAct, SaveMode
from models.fuse import Chain, find_chains, fuse_

# float64 throughout: the fused op reorders the arithmetic, and in float64 that stays far below these bounds.
TOL = {"rtol": 1e-9, "atol": 1e-10}


def cbr(cin: int, cout: int, act: nn.Module | None = None, **conv_kw) -> list[nn.Module]:
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False, **conv_kw)
    return [conv, nn.BatchNorm2d(cout)] + ([act] if act else [])


def user_sequential() -> nn.Module:
    """What a user writes: one Sequential, every BN and activation flavour ConvBNAct supports."""
    return nn.Sequential(
        *cbr(3, 8, nn.ReLU(inplace=True)),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True),
        nn.BatchNorm2d(16, momentum=None),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding="same", dilation=2, groups=4),
        nn.BatchNorm2d(16, affine=False),
        nn.SiLU(),
        nn.Conv2d(16, 16, 1, padding="valid"),
        nn.BatchNorm2d(16, track_running_stats=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one ReLU module used twice, so it cannot be absorbed."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class OwnActBlock(nn.Module):
    """A residual block whose first activation is its own module (absorbed) and whose second is functional."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + x)


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*cbr(3, 8, nn.ReLU()))
        self.blocks = nn.ModuleList([BasicBlock(8), OwnActBlock(8)])
        self.conv_out, self.bn_out = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = torch.relu(self.bn_out(self.conv_out(x)))
        return self.head(x.mean((2, 3)))


RESIDUAL_CHAINS = [
    Chain("stem.0", "stem.1", "stem.2"),
    Chain("blocks.0.conv1", "blocks.0.bn1", None),
    Chain("blocks.0.conv2", "blocks.0.bn2", None),
    Chain("blocks.1.conv1", "blocks.1.bn1", "blocks.1.act1"),
    Chain("blocks.1.conv2", "blocks.1.bn2", None),
    Chain("conv_out", "bn_out", None),
]


def fused_ops(model: nn.Module) -> list[ConvBNAct]:
    return [m for m in model.modules() if isinstance(m, ConvBNAct)]


def assert_close_named(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{name}: {m}")


def fuse_with_names(model: nn.Module, **kw) -> dict[str, str]:
    """fuse_(model) and, for the comparison, the unfused name of each renamed tensor: a fused op at 'a' holds
    the conv's 'a.weight' as 'a.conv.weight' and the BN's '<bn path>.running_mean' as 'a.bn.running_mean'."""
    bn_paths = {id(m): path for path, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert fuse_(model, **kw) is model
    names = {}
    for path, op in model.named_modules():
        if isinstance(op, ConvBNAct):
            names |= {f"{path}.conv.{n}": f"{path}.{n}" for n in op.conv.state_dict()}
            names |= {f"{path}.bn.{n}": f"{bn_paths[id(op.bn)]}.{n}" for n in op.bn.state_dict()}
    return names


def assert_same_model(
    ref: nn.Module, model: nn.Module, names: dict[str, str], shape: tuple[int, ...], steps: int = 3
) -> None:
    """Train both `steps` SGD steps on the same batches comparing outputs and gradients, then every parameter
    and buffer (`ref` is the unfused copy, `names` maps renamed tensors to it), then eval outputs."""
    torch.manual_seed(1)
    ref_params = dict(ref.named_parameters())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        x = torch.randn(*shape, dtype=torch.float64)
        ref.train(), model.train()
        out_ref, out = ref(x), model(x)
        torch.testing.assert_close(out, out_ref, **TOL)
        weight = torch.randn_like(out)  # a loss whose gradient differs per element
        (out_ref * weight).sum().backward()
        (out * weight).sum().backward()
        for name, p in model.named_parameters():
            assert_close_named(name, p.grad, ref_params[names.get(name, name)].grad)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    ref_state = ref.state_dict()
    for name, t in model.state_dict().items():
        assert_close_named(name, t, ref_state[names.get(name, name)])
    ref.eval(), model.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **TOL)


def test_sequential_model_fuses_every_chain_and_keeps_outputs():
    torch.manual_seed(0)
    model = user_sequential().double()
    ref = copy.deepcopy(model)
    param_ids = {id(p) for p in model.parameters()}
    names = fuse_with_names(model)
    ops = fused_ops(model)
    assert [op.act.name for op in ops] == ["relu", "relu6", "silu", "none"]
    assert {id(p) for p in model.parameters()} == param_ids  # adopted, not copied
    assert [type(model[i]) for i in (1, 2, 4, 5, 7, 8, 10)] == [nn.Identity] * 7
    assert ops[2].conv.padding == (2, 2) and ops[3].conv.padding == (0, 0)  # 'same' (k=3, d=2), 'valid'
    assert_same_model(ref, model, names, (4, 3, 12, 12))


def test_residual_model_chains_found_by_fx():
    assert find_chains(ResidualNet()) == RESIDUAL_CHAINS


def test_residual_model_keeps_outputs_and_shared_relu():
    torch.manual_seed(0)
    model = ResidualNet().double()
    ref = copy.deepcopy(model)
    names = fuse_with_names(model, save="fast")
    ops = fused_ops(model)
    assert len(ops) == 6 and all(op.save is SaveMode.FAST for op in ops)
    assert [op.act.name for op in ops] == ["relu", "none", "none", "silu", "none", "none"]
    assert type(model.blocks[0].relu) is nn.ReLU  # shared: stays where it is
    assert type(model.blocks[1].act1) is nn.Identity
    assert_same_model(ref, model, names, (4, 3, 8, 8))


def test_frozen_bn_stays_in_eval_mode():
    torch.manual_seed(0)
    model = ResidualNet().double()
    model.blocks[0].bn1.eval()  # a user freezing one BN while training the rest
    ref = copy.deepcopy(model)
    fuse_(model)
    assert not model.blocks[0].conv1.training and model.blocks[0].conv2.training
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), **TOL)
    torch.testing.assert_close(model.blocks[0].conv1.bn.running_mean, ref.blocks[0].bn1.running_mean, **TOL)


def test_fuse_is_idempotent_and_quiet():
    model = fuse_(ResidualNet())
    mixed = nn.Sequential(ConvBNAct(3, 8, 3, padding=1), *cbr(8, 8, nn.ReLU()))  # a preset plus a user head
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # models holding ConvBNAct still trace (it is an fx leaf): no warning
        assert find_chains(model) == []
        fuse_(model)
        assert find_chains(mixed) == [Chain("1", "2", "3")]
    assert len(fused_ops(model)) == 6


class Untraceable(nn.Module):
    """Data-dependent control flow at the top; a Sequential and a traceable block inside."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*cbr(3, 8, nn.ReLU()), *cbr(8, 8))
        self.block = BasicBlock(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.block(self.features(x))
        if x.sum() > 0:
            x = x * 2
        return self.bn(self.conv(x))


def test_untraceable_model_falls_back_with_warning():
    torch.manual_seed(0)
    model = Untraceable().double()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"cannot trace 'the model' \(TraceError: .*control flow"):
        names = fuse_with_names(model)
    assert [op.act.name for op in fused_ops(model)] == ["relu", "none", "none", "none"]
    assert type(model.conv) is nn.Conv2d  # called from the untraceable forward: unknown use, left alone
    assert_same_model(ref, model, names, (4, 3, 8, 8))


class UntraceableSequential(nn.Sequential):
    pass


class Branchy(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_sequential_is_scanned_and_innermost_module_named():
    torch.manual_seed(0)
    hooked_relu = nn.ReLU()
    hooked_relu.register_forward_hook(lambda m, i, o: o + 1)  # must keep running: not absorbed
    model = nn.Sequential(nn.Sequential(*cbr(3, 8, nn.SiLU()), Branchy(), *cbr(8, 4, hooked_relu))).double()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning) as record:
        names = fuse_with_names(model)
    # One warning, for the innermost untraceable module (Branchy has no children, so it is never traced).
    assert [str(w.message).split(" (")[0] for w in record] == ["fuse_: torch.fx cannot trace '0'"]
    assert [op.act.name for op in fused_ops(model)] == ["silu", "none"]
    assert model[0][6] is hooked_relu
    assert_same_model(ref, model, names, (2, 3, 8, 8))


class ConvUsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.mean()


class EvalOnlyBranch(nn.Module):
    """conv -> bn in training, conv -> scale -> bn in eval: fusing by the train trace would break eval."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        if not self.training:
            y = y * 2
        return self.bn(y)


class SubConv(nn.Conv2d):
    pass


class Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.alias = self.seq[0]  # the same conv under a second name; a swap of one would miss the other

    def forward(self, x):
        return self.seq(x)


def hooked() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    return model


UNFUSABLE = {
    "bn_not_after_conv": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)),
    "reflect_padding": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(4)),
    "same_even_kernel": lambda: nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"), nn.BatchNorm2d(4)),
    "conv_output_used_twice": ConvUsedTwice,
    "shared_bn": SharedBN,
    "reads_conv_weight": ReadsWeight,
    "eval_only_branch": EvalOnlyBranch,
    "conv_subclass": lambda: nn.Sequential(SubConv(3, 4, 3), nn.BatchNorm2d(4)),
    "aliased_conv": Aliased,
    "forward_hook": hooked,
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's, for same_even_kernel
@pytest.mark.parametrize("name", list(UNFUSABLE))
def test_unfusable_chains_stay(name):
    torch.manual_seed(0)
    model = UNFUSABLE[name]().double()
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_with_names(model) == {}
    assert fused_ops(model) == [] and list(model.state_dict()) == keys
    assert_same_model(ref, model, {}, (2, 3, 6, 6), steps=1)


class PreActivationUsed(nn.Module):
    """The BN output feeds the ReLU and the sum: conv+bn fuse, the ReLU stays."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        z = self.bn(self.conv(x))
        return self.relu(z) + z


def test_activation_stays_when_bn_output_used_twice():
    torch.manual_seed(0)
    model = PreActivationUsed().double()
    ref = copy.deepcopy(model)
    assert find_chains(model) == [Chain("conv", "bn", None)]
    names = fuse_with_names(model)
    assert type(model.relu) is nn.ReLU
    assert_same_model(ref, model, names, (2, 3, 6, 6))


def test_mismatched_num_features_stays():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(4))  # would fail at run time anyway
    assert find_chains(model) == [] and fused_ops(fuse_(model)) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="save mode must be one of"):
        fuse_(ResidualNet(), save="tiny")
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        fuse_("resnet")


def _trained_small(in_channels: int = 3):
    """The eager `small` layout (plain Conv2d/BatchNorm2d), a few training steps so running stats are not 0/1."""
    from bench._eager_cnn import build_eager
    from models.cnn import ModelConfig

    torch.manual_seed(0)
    m = build_eager(ModelConfig.preset("small", in_channels=in_channels), fusable=True)
    for _ in range(3):
        m(torch.randn(8, in_channels, 12, 12)).sum().backward()
    return m.eval()


@pytest.mark.parametrize("batch, size", [(1, 8), (4, 3)])
def test_inference_module_equals_eval_model_and_leaves_it_alone(batch, size):
    """Folded, channels_last (>= 16 pixels) or NCHW (3x3 maps): equal outputs; the original keeps its modules."""
    from models.fuse import FoldedConvAct, inference_module

    model = _trained_small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inf = inference_module(model)
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        ref = model(x)
        out = inf(x)
        out_nograd = inf(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_nograd, ref, atol=1e-5, rtol=1e-5)
    # stem, 3 blocks x (conv1, conv2), 2 strided 1x1 shortcuts
    assert sum(isinstance(m, FoldedConvAct) for m in inf.modules()) == 9
    assert not any(isinstance(m, nn.BatchNorm2d | ConvBNAct) for m in inf.modules())
    assert not any(p.requires_grad for p in inf.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original must stay unfused"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inference_module_from_unified_cnn_and_compiled():
    """The compiled form (what Serve and the sweep run) equals the eval model at the batch sizes it compiles
    for; a second model of the same class (a Serve hot update) runs with its own weights, not the first one's;
    called with autograd on it records nothing and compiles nothing."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import CompiledInference, inference_module

    def trained(seed):
        torch.manual_seed(seed)
        model = build_model(ModelConfig.preset("tiny", in_channels=3))
        model(torch.randn(8, 3, 8, 8))  # one batch of running statistics
        return model.eval()

    model, other = trained(0), trained(1)
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    try:
        compiled = inference_module(model, compile=True)
        assert isinstance(compiled, CompiledInference)
        assert len(compiled.state_dict()) == len(inference_module(model).state_dict())  # listed once
        seconds = compiled.warmup(x, [1, 2])
        assert sorted(seconds) == [1, 2] and all(s > 0 for s in seconds.values())
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(inference_module(model)(x), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(compiled(x[:1]), ref[:1], atol=1e-4, rtol=1e-4)
            ref_other = other(x)
        out = compiled(x)  # autograd on: run without it, and without a compile for this grad mode
        assert out.grad_fn is None and not out.requires_grad
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            out_other = inference_module(other, compile=True)(x)
        assert (ref_other - ref).abs().max() > 1e-2  # the two models do differ
        torch.testing.assert_close(out_other, ref_other, atol=1e-4, rtol=1e-4)
        with pytest.raises(ValueError, match="batch sizes must be positive ints"):
            compiled.warmup(x, [0])
    finally:
        torch._dynamo.reset()


def test_compiled_for_inference_fp32_is_the_served_form():
    """The sweep times fp32 through the same callable Serve runs."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import CompiledInference
    from models.quantize import compiled_for_inference

    fn = compiled_for_inference(build_model(ModelConfig.preset("tiny", in_channels=3)))
    assert isinstance(fn, CompiledInference)


def test_inference_module_rejects_non_modules():
    from models.fuse import inference_module

    with pytest.raises(TypeError, match="nn.Module"):
        inference_module(lambda x: x)
    with pytest.raises(TypeError, match="compile must be a bool"):
        inference_module(nn.Conv2d(1, 1, 1), compile="yes")


def test_fastest_inference_module_keeps_the_faster_form_and_the_outputs():
    """Serve's fp32 form: the faster of the eager folded copy and its compile on this input shape (the two
    orders are each right somewhere: bench/results/train_throughput.json), with the model's outputs."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import CompiledInference, OneDNNInference, ScriptedInference, fastest_inference_module

    model = build_model(ModelConfig.preset("tiny", in_channels=1)).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    form, t = fastest_inference_module(model, x, (1, 4), iters=3)
    assert set(t) == {"eager_s", "compiled_s", "onednn_s", "scripted_s", "compile_s"} and t["compile_s"] > 0
    best = min(("eager_s", "compiled_s", "onednn_s", "scripted_s"), key=t.__getitem__)
    kinds = {"compiled_s": CompiledInference, "onednn_s": OneDNNInference, "scripted_s": ScriptedInference}
    assert isinstance(form, kinds.get(best, nn.Module)), t
    assert (best == "eager_s") != isinstance(form, CompiledInference | OneDNNInference | ScriptedInference), t
    with torch.no_grad():
        torch.testing.assert_close(form(x).clone(), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="example must be a"):
        fastest_inference_module(model, torch.rand(8, 8))
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        fastest_inference_module(model, x, (0,))


def test_fastest_inference_module_scores_cpu_time_at_one_thread(monkeypatch):
    """At one torch thread the forms are scored by this thread's CPU time, not wall time (a loaded machine
    swung the choice): a form that waits 20 ms off-CPU per call beats one that computes for 5 ms; wall time
    would choose the other way."""
    import time as time_mod

    from models import fuse
    from models.cnn import ModelConfig, build_model

    class Busy(nn.Module):  # the eager form: 5 ms of CPU time a call
        def forward(self, x):
            end = time_mod.thread_time() + 0.005
            while time_mod.thread_time() < end:
                pass
            return x

    monkeypatch.setattr(fuse, "inference_module", lambda model, compile=False: Busy())
    monkeypatch.setattr(fuse, "onednn_available", lambda: False)

    def untraceable(folded, example):
        raise ValueError("not traced in this test")

    monkeypatch.setattr(fuse, "ScriptedInference", untraceable)
    monkeypatch.setattr(fuse.CompiledInference, "warmup", lambda self, example, sizes: {1: 0.0})
    monkeypatch.setattr(fuse.CompiledInference, "forward", lambda self, x: time_mod.sleep(0.02) or x)
    model = build_model(ModelConfig.preset("tiny", in_channels=1))
    with _one_torch_thread():
        form, t = fuse.fastest_inference_module(model, torch.rand(1, 1, 8, 8), (1,), iters=3)
    assert isinstance(form, fuse.CompiledInference) and t["compiled_s"] < 0.002 < 0.004 < t["eager_s"], t


@pytest.mark.parametrize("size", [8, 3])
def test_onednn_form_equals_eval_model_with_residual_adds_fused(size):
    """The oneDNN form of the eager `small` layout (Sequential conv/bn/relu, `act(conv2(conv1(x)) + shortcut)`)
    and of the unified CNN: outputs equal the eval model's at batch 1 and 5 (planned at batch 2), channels_last
    (8x8) and 3x3 maps, each conv in the form it timed fastest (Winograd only where it applies); every block's
    conv2 + add + relu is one module."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import FoldedConvAct, OneDNNConvAct, onednn_inference_module

    unified = build_model(ModelConfig.preset("small", in_channels=3))
    unified(torch.randn(8, 3, 12, 12))  # running statistics
    for model in (_trained_small(), unified.eval()):
        with _one_torch_thread():  # tiny convs: 2 OpenMP threads on a loaded machine took 10x longer
            form = onednn_inference_module(model, torch.randn(2, 3, size, size), iters=1)
        ops = [m for m in form.modules() if isinstance(m, OneDNNConvAct)]
        assert len(ops) == 9 and not any(isinstance(m, FoldedConvAct | nn.BatchNorm2d) for m in form.modules())
        assert sum(op.residual_act == "relu" for op in ops) == 3, [repr(op) for op in ops]
        assert all(not op.winograd or (op.shape[-2:] == (3, 3) and op.stride == [1, 1]) for op in ops)
        for batch in (1, 5):
            x = torch.randn(batch, 3, size, size)
            with torch.inference_mode():
                torch.testing.assert_close(form(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("act", ["none", "relu", "relu6", "silu"])
@pytest.mark.parametrize("packed", [True, False])
def test_onednn_conv_act_packed_and_plain_equal_the_folded_conv(act, packed):
    """Both ways of one conv (the oneDNN primitive with post-ops, F.conv2d then in place) compute the folded
    conv + act, and conv + residual + relu for act='none'; a residual after an activation is refused."""
    from models.fuse import FoldedConvAct, OneDNNConvAct

    torch.manual_seed(0)
    op = ConvBNAct(8, 16, 3, stride=2, padding=1, act=act)
    op(torch.randn(4, 8, 10, 10))
    folded = FoldedConvAct(op.eval())
    x, other = torch.randn(3, 8, 10, 10), torch.randn(3, 16, 5, 5)
    with torch.inference_mode():
        ref = folded(x.clone())
        y = OneDNNConvAct(folded, [3, 8, 10, 10], packed=packed)(x)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        if act == "none":
            res = OneDNNConvAct(folded, [3, 8, 10, 10], residual_act="relu", packed=packed)(x, other)
            torch.testing.assert_close(res, torch.relu(ref + other), atol=1e-5, rtol=1e-5)
    if act != "none":
        with pytest.raises(ValueError, match="residual add fuses after an act='none' conv"):
            OneDNNConvAct(folded, [3, 8, 10, 10], residual_act="relu")


@contextlib.contextmanager
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_onednn_form_of_the_tests_resnet18_equals_the_eval_model():
    """The oneDNN form (each conv in the form it timed fastest, Winograd among them) of the tests' torchvision-named
    resnet18 (narrowed to width 16 for time) keeps the eval model's logits at the planned batch and another."""
    from tv_models import resnet18

    from models.fuse import OneDNNConvAct, OneDNNInference

    torch.manual_seed(0)
    model = resnet18(width=16)
    model(torch.randn(8, 3, 16, 16))  # running statistics
    model.eval()
    with _one_torch_thread():  # tiny convs: 2 OpenMP threads on a loaded machine took 10x longer
        form = OneDNNInference(model, torch.randn(1, 3, 16, 16), (1, 4), iters=1)
        assert sum(isinstance(m, OneDNNConvAct) for m in form.plan_for(4).modules()) == 20
        for batch in (1, 4, 6):
            x = torch.randn(batch, 3, 16, 16)
            with torch.inference_mode():
                torch.testing.assert_close(form(x), model(x), atol=1e-4, rtol=1e-3)


def test_onednn_winograd_form_equals_the_folded_conv_and_needs_stride_1():
    """The Winograd way of a stride-1 3x3 conv computes the folded conv + act (and + residual + relu); a strided
    conv is refused."""
    from models.fuse import FoldedConvAct, OneDNNConvAct

    torch.manual_seed(0)
    for m in (2, 4):
        op = ConvBNAct(8, 16, 3, padding=1, act="none")
        op(torch.randn(4, 8, 7, 7))
        folded = FoldedConvAct(op.eval())
        x, other = torch.randn(3, 8, 7, 7), torch.randn(3, 16, 7, 7)
        with torch.inference_mode():
            ref = folded(x.clone())
            form = OneDNNConvAct(folded, [3, 8, 7, 7], winograd=m)
            torch.testing.assert_close(form(x), ref, atol=1e-4, rtol=1e-4)
            res = OneDNNConvAct(folded, [3, 8, 7, 7], residual_act="relu", winograd=m)(x, other)
            torch.testing.assert_close(res, torch.relu(ref + other), atol=1e-4, rtol=1e-4)
        assert not form.packed and f"winograd F({m}, 3)" in repr(form)
    strided = FoldedConvAct(ConvBNAct(8, 16, 3, stride=2, padding=1).eval())
    with pytest.raises(ValueError, match="winograd needs a stride-1, 3x3"):
        OneDNNConvAct(strided, [3, 8, 7, 7], winograd=2)
    with pytest.raises(ValueError, match="winograd must be 0 or one of"):
        OneDNNConvAct(folded, [3, 8, 7, 7], winograd=3)


@pytest.mark.parametrize("fast", ["packed", "nchw", "winograd"])
def test_onednn_form_is_chosen_by_timing(monkeypatch, fast):
    """Each conv runs the form that timed fastest on its planning call: make every form but one kind spend 5 ms of
    CPU time per call and every conv picks that kind (Winograd where it applies, the strided convs fall back to
    the fastest of the rest). Timed by thread CPU time, so the delay is a busy loop, not a sleep. Batch 2: at
    batch 1 these narrow convs never time the packed form (the next test)."""
    import time as time_mod

    from models import fuse
    from models.cnn import ModelConfig, build_model

    real = fuse.OneDNNConvAct.forward

    def kind(op) -> str:
        return "winograd" if op.winograd else "packed" if op.packed else "cl" if op.channels_last else "nchw"

    def forward(self, x, other=None):
        if kind(self) != fast:
            end = time_mod.thread_time() + 0.005
            while time_mod.thread_time() < end:
                pass
        return real(self, x, other)

    monkeypatch.setattr(fuse.OneDNNConvAct, "forward", forward)
    model = build_model(ModelConfig.preset("tiny", in_channels=1)).eval()
    with _one_torch_thread():  # at load 12 a 2-thread call of these tiny convs took up to 40 ms
        form = fuse.onednn_inference_module(model, torch.randn(2, 1, 8, 8), iters=1)
    ops = [m for m in form.modules() if isinstance(m, fuse.OneDNNConvAct)]
    fits = [op.shape[-2:] == (3, 3) and op.stride == [1, 1] for op in ops]
    assert ops and all(kind(op) == fast for op, f in zip(ops, fits) if f or fast != "winograd"), [repr(o) for o in ops]
    assert any(fits)


@pytest.mark.parametrize(("channels", "batch", "packed"), [(16, 1, False), (16, 2, True), (128, 1, True)])
def test_onednn_packed_form_at_batch_1_only_for_wide_convs(monkeypatch, channels, batch, packed):
    """At batch 1 a conv of fewer than _PACKED_MIN_CHANNELS input channels never runs packed, even where packed
    times fastest (it ran slower inside `small` than on its own); a wider one, or any at batch 2, does. Convs
    whose fastest form takes under _SHORT_CALL_S are timed _SHORT_CALL_ITERS times as often."""
    import time as time_mod

    from models import fuse
    from models.fuse import FoldedConvAct

    real, calls = fuse.OneDNNConvAct.forward, Counter()

    def forward(self, x, other=None):
        calls[id(self)] += 1
        if not self.packed:  # every other form 5 ms of CPU time per call
            end = time_mod.thread_time() + 0.005
            while time_mod.thread_time() < end:
                pass
        return real(self, x, other)

    monkeypatch.setattr(fuse.OneDNNConvAct, "forward", forward)
    # between a real call of these small convs (0.05-1 ms on a loaded machine) and the 5 ms ones
    monkeypatch.setattr(fuse, "_SHORT_CALL_S", 0.004)
    torch.manual_seed(0)
    op = ConvBNAct(channels, 8, 3, padding=1)
    op(torch.randn(4, channels, 4, 4))
    size = [batch, channels, 4, 4]
    choice = fuse._ConvChoice(FoldedConvAct(op.eval()), size, None, iters=2)
    with _one_torch_thread(), torch.inference_mode():
        choice(torch.randn(*size))
    assert (choice.chosen is choice.forms[0]) is packed
    # the packed call is under _SHORT_CALL_S: timed 3x as often; where it is not timed, the forms that take 5 ms
    # each are timed `iters` times; each after one untimed call, and the chosen one runs once more
    assert calls[id(choice.chosen)] == 2 + 2 * (fuse._SHORT_CALL_ITERS if packed else 1), dict(calls)


def test_onednn_form_of_an_untraceable_model_and_bad_input():
    """A model fx cannot trace gets each conv swapped in place (no add fused) and keeps its outputs; the
    per-batch dispatch runs the plan of the largest planned batch <= the call's; bad examples are refused."""
    from models.fuse import OneDNNConvAct, OneDNNInference, onednn_inference_module

    torch.manual_seed(0)
    model = Untraceable()
    model(torch.randn(4, 3, 8, 8))
    model.eval()
    form = onednn_inference_module(model, torch.randn(1, 3, 8, 8), iters=1)
    assert sum(isinstance(m, OneDNNConvAct) for m in form.modules()) == 4
    x = torch.randn(3, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(form(x), model(x), atol=1e-5, rtol=1e-5)
    by_batch = OneDNNInference(model, x, (4, 1), iters=1)
    assert by_batch.batch_sizes == [1, 4]
    assert by_batch.plan_for(1) is by_batch.plans[0] and by_batch.plan_for(3) is by_batch.plans[0]
    assert by_batch.plan_for(4) is by_batch.plans[1] and by_batch.plan_for(64) is by_batch.plans[1]
    torch.testing.assert_close(by_batch(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="example must be a"):
        onednn_inference_module(model, torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="CPU float32"):
        onednn_inference_module(model, torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="iters must be a positive int"):
        onednn_inference_module(model, torch.randn(1, 3, 8, 8), iters=0)
    with pytest.raises(ValueError, match="batch_sizes must be positive ints"):
        OneDNNInference(model, x, (0,))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_traced_form_equals_the_eval_model_at_every_batch_size(preset):
    """ScriptedInference: the folded copy traced at one batch size and frozen gives the model's outputs at others
    (batch 1, odd sizes), as inference tensors, and keeps no parameters of its own beyond the folded copy's."""
    from models.cnn import ModelConfig, build_model
    from models.fuse import ScriptedInference, inference_module

    torch.manual_seed(0)
    model = build_model(ModelConfig.preset(preset, in_channels=1)).eval()
    folded = inference_module(model)
    form = ScriptedInference(folded, torch.rand(1, 1, 8, 8))
    for n in (1, 5, 17):
        x = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
        out = form(x)
        assert out.is_inference() and out.shape == (n, 10)
        with torch.no_grad():
            torch.testing.assert_close(out.clone(), model(x), atol=1e-5, rtol=1e-5)
    assert [id(p) for p in form.parameters()] == [id(p) for p in folded.parameters()]


def test_a_model_tracing_cannot_follow_is_not_a_traced_form():
    """A model whose graph depends on the batch (Python control flow on the shape) traces into the wrong graph
    for other batch sizes: ScriptedInference refuses it (ValueError), and fastest_inference_module times the other
    forms instead."""
    from models import fuse

    class ByBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = self.conv(x).flatten(1)
            return y * 2 if x.shape[0] == 2 else y

    with pytest.raises(ValueError, match="cannot be traced as one graph"):
        fuse.ScriptedInference(ByBatch().eval(), torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="folded must be an nn.Module"):
        fuse.ScriptedInference(lambda x: x, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="example must be a batch"):
        fuse.ScriptedInference(ByBatch(), torch.rand(8))
    form, t = fuse.fastest_inference_module(ByBatch().eval(), torch.rand(1, 1, 8, 8), (1, 2), iters=1)
    assert "scripted_s" not in t and not isinstance(form, fuse.ScriptedInference)
