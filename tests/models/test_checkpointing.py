import copy

import pytest
import torch
import torch.nn.functional as F

from models.checkpointing import CheckpointConfig, Checkpointed, checkpoint_
from models.cnn import ModelConfig, build_model


def saved_bytes(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    return sum(storages.values()), loss


@pytest.mark.parametrize("every", [1, 2])
def test_checkpointing_saves_memory_and_keeps_gradients(every):
    torch.manual_seed(0)
    base = build_model(ModelConfig(in_channels=3, num_classes=5, widths=(8, 16, 16), depths=(2, 1, 1)))
    ckpt = checkpoint_(copy.deepcopy(base), CheckpointConfig(every=every))
    n_wrapped = sum(isinstance(m, Checkpointed) for m in ckpt.modules())
    assert n_wrapped == (4 if every == 1 else 2)
    x = torch.randn(6, 3, 16, 16)
    y = torch.randint(0, 5, (6,))
    b_base, _ = saved_bytes(base, x)
    b_ckpt, _ = saved_bytes(ckpt, x)
    assert b_ckpt < (0.75 if every == 1 else 0.95) * b_base
    for m in (base, ckpt):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    for (name, p), q in zip(base.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # running statistics updated exactly once per step (the recompute pass leaves them alone)
    for a, b in zip(base.buffers(), ckpt.buffers()):
        torch.testing.assert_close(a.float(), b.float())


def test_eval_and_no_grad_skip_checkpointing():
    model = checkpoint_(build_model(ModelConfig.preset("tiny")), CheckpointConfig.parse("all"))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_parse_and_bad_config():
    assert CheckpointConfig.parse("none").every == 0
    assert CheckpointConfig.parse("3").every == 3
    with pytest.raises(ValueError, match="checkpointing must be"):
        CheckpointConfig.parse("some")
    with pytest.raises(ValueError, match="every must be"):
        CheckpointConfig(every=-1)
    with pytest.raises(ValueError, match="no nn.Sequential"):
        checkpoint_(torch.nn.Linear(2, 2), CheckpointConfig(every=1))
