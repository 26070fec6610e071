"""torch.compile(fullgraph=True) of models holding the unified operator: same outputs, gradients and running
statistics as eager, in train and eval mode, lean and fast.

Most cases compile with the `aot_eager` backend: it runs dynamo and AOTAutograd through the op's custom-op form,
fake kernels and registered backward (everything that can break tracing) without inductor's C++ compile, which
costs tens of seconds per graph on a loaded CPU. One case per save mode and the `small` training step go through
inductor itself. Tolerances: 1e-5 absolute/relative (fp32; the same kernels run, only the order of launches can
differ), 1e-4 for gradients summed over a whole model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kernels.conv_bn import ConvBNAct, plan_save_modes_, plan_weight_layouts_
from models.cnn import ModelConfig, build_model


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _pair(save: str, act: str = "relu", **kw) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    m = ConvBNAct(4, 6, 3, padding=1, act=act, save=save, **kw)
    with torch.no_grad():
        if m.bn.affine:
            m.bn.weight.uniform_(0.5, 1.5)
            m.bn.bias.uniform_(-0.5, 0.5)
    return m, copy.deepcopy(m)


def _grads(m: nn.Module, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """[output, grad of x, grads of the parameters] for an output gradient drawn from `seed`."""
    x = x.clone().requires_grad_()
    out = m(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device))
    return [out.detach(), x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize(
    "save, act, backend, kw",
    [
        ("lean", "relu", "inductor", {}),
        ("fast", "relu", "inductor", {}),
        ("lean", "silu", "aot_eager", dict(stride=2, bias=True)),
        ("fast", "none", "aot_eager", dict(groups=2)),
        ("fast", "relu6", "aot_eager", dict(affine=False)),
    ],
)
def test_compiled_train_and_eval_match_eager(save, act, backend, kw):
    eager, comp = _pair(save, act, **kw)
    compiled = torch.compile(comp, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    for step in range(2):  # two steps: the running statistics of the first feed nothing, but are compared
        x = torch.randn(3, 4, 7, 7, generator=g)
        for a, b in zip(_grads(eager, x, step), _grads(compiled, x, step)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(comp.bn.running_mean, eager.bn.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(comp.bn.running_var, eager.bn.running_var, atol=1e-6, rtol=1e-6)
    assert int(comp.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 2
    eager.eval(), comp.eval()
    x = torch.randn(2, 4, 7, 7, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("save", ["lean", "fast"])
def test_compiled_running_stats_update_like_eager(save):
    """The custom ops are functional: the compiled module copies the new running statistics in."""
    eager, comp = _pair(save)
    compiled = torch.compile(comp, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 4, 6, 6)
    eager(x), compiled(x)
    assert not torch.equal(comp.bn.running_var, torch.ones(6))
    torch.testing.assert_close(comp.bn.running_mean, eager.bn.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comp.bn.running_var, eager.bn.running_var, atol=1e-6, rtol=1e-6)


def _train_step_matches(preset: str, save: str, backend: str, size: int, plan: bool = False) -> None:
    cfg = ModelConfig.preset(preset, in_channels=3, save=save)
    torch.manual_seed(0)
    eager = build_model(cfg)
    x, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    if plan:  # as training plans them: NCHW weights on small maps, fast where the conv output is the smaller
        plan_weight_layouts_(eager, x)
        plan_save_modes_(eager, x)
    comp = copy.deepcopy(eager)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (eager, comp)]
    compiled = torch.compile(comp, fullgraph=True, backend=backend)
    for _ in range(2):
        losses = []
        for m, opt in zip((eager, compiled), opts):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
    for (name, a), b in zip(eager.named_buffers(), comp.buffers()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)


def test_compiled_training_step_small_inductor():
    """Planned as training plans it (weight layouts, then lean or fast per op): stem and stage 1 lean, stages 2-3
    fast, in one inductor graph."""
    _train_step_matches("small", "lean", "inductor", 8, plan=True)


@pytest.mark.parametrize("save", ["lean", "fast"])
def test_compiled_training_step_resnet18(save):
    _train_step_matches("resnet18", save, "aot_eager", 8)


@pytest.mark.gpu
@pytest.mark.parametrize("save", ["lean", "fast"])
def test_compiled_matches_eager_cuda(save):
    """On CUDA the op's custom ops run the Triton kernels; inductor calls them as opaque kernels."""
    eager, comp = (m.cuda() for m in _pair(save))
    compiled = torch.compile(comp, fullgraph=True)
    x = torch.randn(8, 4, 16, 16, device="cuda")
    for a, b in zip(_grads(eager, x, 0), _grads(compiled, x, 0)):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(comp.bn.running_var, eager.bn.running_var, atol=1e-5, rtol=1e-5)
    eager.eval(), comp.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)


def test_compiled_fast_runs_small_map_convs_nchw_through_an_opaque_op():
    """Inductor's CPU layout optimization makes every aten conv of a graph channels_last; compiled, the fast
    form's small wide maps (<= 16 pixels, >= 256 channels: NCHW in eager) go through tandem::conv2d_nchw, which
    it cannot re-layout, the other convs stay aten convs. Through inductor: same outputs and gradients as eager."""
    from torch._inductor.compile_fx import compile_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        ConvBNAct(4, 8, 3, padding=1, save="fast"),  # 8x8 input: 64 pixels, aten conv
        ConvBNAct(8, 256, 3, stride=4, padding=1, save="fast"),  # 8x8 input (2x2 out): aten conv
        ConvBNAct(256, 256, 3, padding=1, bias=True, save="fast"),  # 2x2 input, 256 channels: the op
        ConvBNAct(256, 6, 1, act="none", save="fast"),  # the op
        ConvBNAct(6, 6, 3, padding=1, save="fast"),  # 2x2 input, 6 channels: aten conv
    )
    ref = copy.deepcopy(model)
    targets: list = []

    def recording(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=recording)
    x = torch.randn(3, 4, 8, 8)
    for a, b in zip(_grads(ref, x, 0), _grads(compiled, x, 0)):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    nchw_op = (torch.ops.tandem.conv2d_nchw, torch.ops.tandem.conv2d_nchw.default)
    assert sum(t in nchw_op for t in targets) == 2, targets
    assert sum(t is torch.nn.functional.conv2d for t in targets) == 3, targets
