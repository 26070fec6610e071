"""The unified operator against the eager Conv2d -> BatchNorm2d -> activation chain."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct, SaveMode, conv_bn_act

ACTS = {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


def make_pair(cin, cout, k, *, act="relu", save="lean", affine=True, momentum=0.1, dtype=torch.float32, **conv_kw):
    """A ConvBNAct and the eager chain holding equal (independent) parameters, BN affine params randomized."""
    torch.manual_seed(0)
    fused = ConvBNAct(cin, cout, k, act=act, save=save, affine=affine, momentum=momentum, **conv_kw).to(dtype)
    if affine:
        with torch.no_grad():
            fused.bn.weight.uniform_(0.5, 1.5)
            fused.bn.bias.uniform_(-0.5, 0.5)
    eager = nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn), ACTS[act]())
    return fused, eager


CASES = [
    dict(cin=4, cout=6, k=3, padding=1),
    dict(cin=4, cout=6, k=3, stride=2, padding=1, bias=True),
    dict(cin=4, cout=8, k=3, padding=2, dilation=2, groups=2),
    dict(cin=6, cout=6, k=3, padding=1, groups=6, affine=False),
    dict(cin=3, cout=5, k=1, stride=2),
]


@pytest.mark.parametrize("save", ["lean", "fast"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_gradcheck_float64(case, act, save):
    kw = dict(CASES[case])
    cin, cout, k = kw.pop("cin"), kw.pop("cout"), kw.pop("k")
    affine = kw.pop("affine", True)
    bias = kw.pop("bias", False)
    g = torch.Generator().manual_seed(case)
    x = torch.randn(3, cin, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(cout, cin // kw.get("groups", 1), k, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    gamma = (torch.rand(cout, dtype=torch.float64, generator=g) + 0.5).requires_grad_(affine)
    beta = torch.randn(cout, dtype=torch.float64, generator=g).requires_grad_(affine)

    def f(x, w, b, gamma, beta):
        return conv_bn_act(x, w, b, gamma, beta, None, None, training=True, act=act, save=save, **kw)

    assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("save", ["lean", "fast"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_train_mode_matches_eager_over_steps(case, momentum, save):
    """Outputs, every gradient and the running statistics after several optimizer steps."""
    kw = dict(CASES[case])
    cin, cout, k = kw.pop("cin"), kw.pop("cout"), kw.pop("k")
    fused, eager = make_pair(cin, cout, k, act="relu", save=save, momentum=momentum, **kw)
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(4, cin, 9, 9, generator=g)
        x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_f, out_e = fused(x_f), eager(x_e)
        torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
        grad = torch.randn(out_f.shape, generator=g)
        out_f.backward(grad)
        out_e.backward(grad)
        torch.testing.assert_close(x_f.grad, x_e.grad, atol=1e-5, rtol=1e-4)
        for (name, p_f), p_e in zip(fused.named_parameters(), eager.parameters()):
            torch.testing.assert_close(p_f.grad, p_e.grad, atol=1e-4, rtol=1e-4, msg=name)
        opt_f.step()
        opt_e.step()
        opt_f.zero_grad()
        opt_e.zero_grad()
    bn_e = eager[1]
    torch.testing.assert_close(fused.bn.running_mean, bn_e.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.bn.running_var, bn_e.running_var, atol=1e-5, rtol=1e-5)
    assert int(fused.bn.num_batches_tracked) == int(bn_e.num_batches_tracked) == 4


@pytest.mark.parametrize("act", list(ACTS))
def test_eval_folded_matches_eager_and_refreshes_after_step(act):
    fused, eager = make_pair(4, 6, 3, act=act, padding=1, bias=True)
    x = torch.randn(8, 4, 7, 7)
    fused(x), eager(x)  # one training step of running statistics
    fused.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)
        w_before = fused.folded()[0].clone()
        assert fused.folded()[0] is fused.folded()[0], "folded weights must be cached between calls"
    # an optimizer step on both: the cached folded weights must follow
    for m in (fused, eager):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).square().mean().backward()
        opt.step()
        m.eval()
    with torch.no_grad():
        assert not torch.equal(fused.folded()[0], w_before)
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)
        # running statistics changed in place (load_state_dict copies into the same tensors)
        state = eager.state_dict()
        state["1.running_var"].mul_(3.0)
        eager.load_state_dict(state)
        fused.bn.load_state_dict({k[2:]: v for k, v in state.items() if k.startswith("1.")})
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_eval_grad_flows_through_fold():
    """Fine-tuning with frozen BN statistics (eval mode, grad on) differentiates through the fold."""
    fused, eager = make_pair(3, 4, 3, padding=1)
    fused.eval(), eager.eval()
    x = torch.randn(2, 3, 6, 6)
    fused(x).sum().backward()
    eager(x).sum().backward()
    torch.testing.assert_close(fused.conv.weight.grad, eager[0].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.bn.weight.grad, eager[1].weight.grad, atol=1e-5, rtol=1e-5)


def test_untracked_running_stats_use_batch_stats_in_eval():
    fused, eager = make_pair(3, 4, 3, padding=1, track_running_stats=False)
    fused.eval(), eager.eval()
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_bf16_autocast_close_to_eager():
    fused, eager = make_pair(8, 16, 3, padding=1, save="lean")
    x = torch.randn(4, 8, 10, 10)
    x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_e = fused(x_f), eager(x_e)
    assert out_f.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_e.float(), atol=0.1, rtol=0.05)
    out_f.float().sum().backward()
    out_e.float().sum().backward()
    assert x_f.grad.dtype == torch.float32 and fused.conv.weight.grad.dtype == torch.float32
    torch.testing.assert_close(fused.conv.weight.grad, eager[0].weight.grad, atol=0.5, rtol=0.1)


def test_saved_tensors_lean_and_fast():
    """lean keeps the conv input + stats; fast adds the conv output; eager also keeps BN input and ReLU output."""

    def saved_bytes(module, x):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return sum(seen.values())

    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    act_bytes = x.numel() * 4
    fused, eager = make_pair(16, 16, 3, padding=1)
    lean = saved_bytes(fused, x)
    fused.save = SaveMode.FAST
    fast = saved_bytes(fused, x)
    ref = saved_bytes(eager, x)
    assert act_bytes <= lean < 1.1 * act_bytes
    assert 2 * act_bytes <= fast < 2.1 * act_bytes
    assert ref >= 3 * act_bytes


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.randn(4, 6, 6), "4-D"),
        (torch.randn(2, 5, 6, 6), "4 channels"),
    ],
)
def test_bad_input_raises(bad, err):
    m = ConvBNAct(4, 8, 3)
    with pytest.raises(ValueError, match=err):
        m(bad)


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="act must be one of"):
        ConvBNAct(3, 4, 3, act="gelu")
    with pytest.raises(ValueError, match="save mode must be one of"):
        ConvBNAct(3, 4, 3, save="tiny")
    with pytest.raises(ValueError, match="num_features"):
        ConvBNAct.from_modules(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvBNAct.from_modules(nn.Conv2d(3, 4, 3, padding_mode="reflect"), nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        ConvBNAct(3, 4, 3)([1, 2, 3])


def test_from_modules_keeps_parameter_objects():
    conv, bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
    m = ConvBNAct.from_modules(conv, bn, act="relu")
    assert m.conv.weight is conv.weight and m.bn.running_mean is bn.running_mean
    assert set(m.state_dict()) >= {"conv.weight", "conv.bias", "bn.weight", "bn.running_var"}


@pytest.mark.parametrize("save", ["lean", "fast"])
def test_triton_path_end_to_end(monkeypatch, save):
    """The whole training op with its Triton kernels forced on (interpreter on CPU) equals the eager chain."""
    import kernels.bn_act
    import kernels.bn_stats

    monkeypatch.setattr(kernels.bn_act, "use_triton", lambda t: True)
    monkeypatch.setattr(kernels.bn_stats, "use_triton", lambda t: True)
    fused, eager = make_pair(4, 6, 3, act="silu", save=save, padding=1)
    x = torch.randn(3, 4, 7, 7)
    x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_e = fused(x_f), eager(x_e)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    torch.testing.assert_close(x_f.grad, x_e.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.bn.weight.grad, eager[1].weight.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fused.bn.running_var, eager[1].running_var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save", ["lean", "fast"])
@pytest.mark.parametrize("cin, size, nchw", [(8, 3, False), (8, 6, False), (256, 4, True), (256, 5, False)])
def test_layouts_small_and_large_maps_match_eager(save, cin, size, nchw):
    """CPU layouts: maps of at most 16 pixels with >= 256 input channels run NCHW (a copy of the channels_last
    weight), everything else channels_last (kernels.conv_bn._NCHW_MIN_CHANNELS); both equal the eager chain in
    train and eval, and the weight stays the same channels_last Parameter."""
    fused, eager = make_pair(cin, 8, 3, act="relu", save=save, padding=1)
    weight = fused.conv.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    x = torch.randn(4, cin, size, size)
    x_f, x_e = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_f, out_e = fused(x_f), eager(x_e)
    torch.testing.assert_close(out_f, out_e, atol=1e-5, rtol=1e-5)
    assert out_f.is_contiguous(memory_format=torch.contiguous_format if nchw else torch.channels_last)
    g = torch.randn(out_f.shape)
    out_f.backward(g), out_e.backward(g)
    torch.testing.assert_close(x_f.grad, x_e.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused.conv.weight.grad, eager[0].weight.grad, atol=1e-4, rtol=1e-4)
    assert fused.conv.weight is weight and weight.is_contiguous(memory_format=torch.channels_last)
    fused.eval(), eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), atol=1e-5, rtol=1e-5)


def test_plan_weight_layouts_keeps_small_map_weights_nchw():
    """After the plan, ops fed small maps (<= 16 pixels) with >= 256 channels hold an NCHW weight (no per-call
    copy), the others channels_last (small narrow maps too); through `.to()` too; values, Parameters, outputs and
    gradients unchanged."""
    from kernels.conv_bn import plan_weight_layouts_

    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(3, 8, 3, padding=1, save="fast"),  # 8x8 input: 64 pixels
        ConvBNAct(8, 256, 3, stride=4, padding=1, save="lean"),  # 8x8 in, 2x2 out
        ConvBNAct(256, 8, 3, padding=1, save="fast"),  # 2x2 input, 256 channels: NCHW
        ConvBNAct(8, 8, 3, padding=1, save="fast"),  # 2x2 input, 8 channels: channels_last
    )
    ref = copy.deepcopy(model)
    params = [p for p in model.parameters()]
    x = torch.randn(4, 3, 8, 8)
    assert plan_weight_layouts_(model, x) == 1
    assert [op.small_maps for op in model] == [False, False, True, False]
    model.to(torch.float32)  # _apply re-lays out: the plan must hold
    w = [op.conv.weight for op in model]
    assert w[0].is_contiguous(memory_format=torch.channels_last) and not w[0].is_contiguous()
    assert w[1].is_contiguous(memory_format=torch.channels_last) and not w[1].is_contiguous()
    assert w[2].is_contiguous()
    assert w[3].is_contiguous(memory_format=torch.channels_last) and not w[3].is_contiguous()
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert model[0].training, "training flags restored"
    _assert_same_outputs_and_grads(model, ref, x)
    assert w[2].grad.is_contiguous()
    with pytest.raises(ValueError, match="example must be a"):
        plan_weight_layouts_(model, torch.randn(3, 8, 8))


@pytest.mark.parametrize("save", ["lean", "fast"])
def test_gradients_have_their_parameters_strides(save):
    """Every parameter's gradient has the parameter's own strides, which DDP's reducer compares with its bucket
    views: 1x1 kernels too, whose strides on their size-1 dims differ between the two formats while both call
    them contiguous (a 1x1 weight kept NCHW strides got channels_last gradients: "Grad strides do not match
    bucket view strides" in every `tandem run`). Channels_last and small-map (NCHW) ops, before and after the
    layout plan."""
    from kernels.conv_bn import plan_weight_layouts_

    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(1, 16, 3, padding=1, save=save),
        ConvBNAct(16, 32, 1, stride=2, save=save),  # 1x1 shortcut-style, channels_last maps
        ConvBNAct(32, 256, 1, stride=2, save=save),  # 2x2 out
        ConvBNAct(256, 8, 1, save=save),  # 2x2 input, 256 channels: NCHW (small map) after the plan
    )
    x = torch.randn(4, 1, 8, 8)
    for plan in (False, True):
        if plan:
            assert plan_weight_layouts_(model, x) == 1
        model.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        bad = {n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()}
        assert bad == {}, f"plan={plan}: (parameter, gradient) strides differ: {bad}"


def _assert_same_outputs_and_grads(model: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """`model` and its untouched copy `ref` give the same outputs on `x` and the same parameter gradients."""
    out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4)


def test_plan_save_modes_keeps_the_conv_output_only_where_it_is_smaller_than_the_weight():
    """Lean ops whose conv output (at the example's batch) has no more elements than their weight save it
    (`fast`); the others stay lean, `fast` ops are left alone; outputs, gradients and training flags unchanged."""
    from kernels.conv_bn import plan_save_modes_

    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(3, 8, 3, padding=1, save="lean"),  # out 4x8x8x8 = 2048 > weight 216: stays lean
        ConvBNAct(8, 32, 3, stride=4, padding=1, save="lean"),  # out 4x32x2x2 = 512 <= 2304: fast
        ConvBNAct(32, 32, 1, save="lean"),  # out 512 <= weight 1024: fast
        ConvBNAct(32, 8, 1, save="fast"),  # already fast
    )
    ref = copy.deepcopy(model)
    x = torch.randn(4, 3, 8, 8)
    assert plan_save_modes_(model, x) == 2
    assert [op.save.value for op in model] == ["lean", "fast", "fast", "fast"]
    assert model[0].training and model[1].bn.training, "training flags restored"
    # a larger batch makes the outputs outgrow the weights: nothing switches
    big = copy.deepcopy(ref)
    assert plan_save_modes_(big, torch.randn(64, 3, 8, 8)) == 0
    _assert_same_outputs_and_grads(model, ref, x)
    with pytest.raises(ValueError, match="example must be a"):
        plan_save_modes_(model, torch.randn(3, 8, 8))


def test_save_plan_decides_at_the_first_training_step_at_its_batch():
    """`plan_save_modes_on_first_step_` makes plan_save_modes_' choice at the batch training runs, by the first
    forward in training mode with grad enabled (evaluations and no-grad forwards leave it pending), once."""
    from kernels.conv_bn import plan_save_modes_, plan_save_modes_on_first_step_

    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(3, 8, 3, padding=1, save="lean"),
        ConvBNAct(8, 32, 3, stride=4, padding=1, save="lean"),
        ConvBNAct(32, 32, 1, save="lean"),
    )
    ref = copy.deepcopy(model)
    plan = plan_save_modes_on_first_step_(model)
    assert plan.pending == 3
    model.eval()
    model(torch.randn(4, 3, 8, 8))
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))
    assert plan.pending == 3 and all(op.save.value == "lean" for op in model)
    model(torch.randn(4, 3, 8, 8)).sum().backward()  # the first step, at batch 4
    assert plan.pending == 0 and plan.switched == plan_save_modes_(ref, torch.randn(4, 3, 8, 8)) == 2
    assert [op.save for op in model] == [op.save for op in ref]
    assert all(not op._forward_hooks for op in model)  # hooks removed: later batches change nothing
    big = copy.deepcopy(ref)
    for op in big:
        op.save = SaveMode.LEAN
    plan = plan_save_modes_on_first_step_(big)
    big(torch.randn(64, 3, 8, 8)).sum().backward()  # a larger batch: every output outgrows its weight
    assert plan.switched == 0 and all(op.save is SaveMode.LEAN for op in big)
