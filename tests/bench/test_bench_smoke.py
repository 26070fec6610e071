"""Smoke tests of the training benchmarks' core functions on tiny settings: they run and return their keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import checkpointing, train_throughput, weighting
from bench._eager_cnn import build_eager, eager_state_dict
from models.cnn import ModelConfig, build_model
from models.fuse import fuse_


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: one thread avoids OpenMP spin-waits when the machine is oversubscribed."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_digits() -> weighting.Data:
    d = weighting.load_digits_data()
    return weighting.Data(d.train_x[:320], d.train_y[:320], d.test_x[:120], d.test_y[:120])


def test_weighting_keys_and_pairing():
    setting = weighting.Setting(dataset="digits", epochs=1, evals_per_epoch=2, batch_size=32)
    res = weighting.run_dataset(setting, seeds=[0, 1], data=_tiny_digits(), progress=False)
    for key in (
        "seed_rule_ratio",
        "best_ratio",
        "best_ratio_ci_high",
        "best_ratio_vs_replacement_ci_high",
        "final_acc_delta_pts",
        "target_acc",
    ):
        assert math.isfinite(res[key]), key
    assert res["best_variant"] in weighting.VARIANTS and res["best_variant"] not in weighting.PRUNING
    lo, hi = res["infobatch_wall_ratio_ci"]
    assert lo <= res["infobatch_wall_ratio"] <= hi and res["infobatch_wall_ratio"] > 0.0
    assert res["infobatch_variant"] == "infobatch_paper"
    ib = res["variants"]["infobatch_paper"]
    assert ib["mean_train_s_to_target"] > 0.0
    assert res["infobatch_acc_delta_pts"] == pytest.approx(100.0 * (ib["final_acc_mean"] - res["uniform_final_acc"]))
    assert set(res["variants"]) == set(weighting.VARIANTS)
    # every variant's ratio lies in its own interval, and the best is the smallest mean ratio among the weighting
    # variants (a mix-up of variants, of numerator and denominator, or of the interval fails here)
    for name, v in res["variants"].items():
        lo, hi = v["ci_vs_uniform_permutation"]
        assert lo <= v["ratio_vs_uniform_permutation"] <= hi, name
    best = res["variants"][res["best_variant"]]
    assert res["best_ratio"] == best["ratio_vs_uniform_permutation"]
    assert res["best_ratio_ci_high"] == best["ci_vs_uniform_permutation"][1]


def test_paper_infobatch_skips_steps_and_paces_the_lr_by_epoch(monkeypatch):
    """The paper's InfoBatch: pruned epochs make fewer optimizer steps than the uniform run (full data, as many
    steps as uniform, in the annealed last epoch), and the LR at each step is the uniform schedule's at the same
    epoch progress, so the last step's LR is the uniform run's near-zero end, not its middle."""
    data = _tiny_digits()
    setting = weighting.Setting(dataset="digits", epochs=4, evals_per_epoch=2, batch_size=32)
    lrs: list[float] = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    run = weighting.train_run(data, setting, weighting.VARIANTS["infobatch_paper"], seed=0)
    per_epoch = len(data.train_x) // setting.batch_size
    assert run["uniform_steps"] == 4 * per_epoch
    assert run["pruned_rows"] > 0 and run["steps"] < run["uniform_steps"] and run["steps"] == len(lrs)
    assert run["steps"] > run["uniform_steps"] // 2  # half of the below-mean rows at most: above half the steps
    assert len(run["curve"]) == 4 * 2 and run["curve"][-1][0] == run["steps"] * setting.batch_size
    peak = max(lrs)
    assert peak == pytest.approx(0.1, rel=0.05)  # the uniform run's peak (warm-up done within the first epoch)
    assert lrs[-1] < 0.05 * peak  # cosine end reached on the last step despite fewer steps
    # the first pruned epoch (epoch 1: scores from epoch 0) starts at progress 1/4 of the cosine
    assert lrs[per_epoch] == pytest.approx(lrs[per_epoch - 1], rel=0.2)


def test_weighting_samplers_draw_what_they_claim():
    n, batch = 100, 10
    perm = weighting.VARIANTS["uniform_permutation"].build(n, batch, seed=0)
    epoch = np.concatenate([perm.next_batch()[0] for _ in range(n // batch)])
    assert np.array_equal(np.sort(epoch), np.arange(n))  # each sample exactly once per epoch
    mix = weighting.VARIANTS["difficulty_mix"].build(n, batch, seed=0)
    mix.record(np.arange(n), np.where(np.arange(n) < 10, 100.0, 1.0))
    mix.queue = mix.queue[:0]  # force a redraw from the recorded difficulties
    idx, scale = mix.next_batch()
    assert scale is not None and len(idx) == batch
    d = np.where(np.arange(n) < 10, 100.0, 1.0)
    p = 0.5 / n + 0.5 * d / d.sum()
    np.testing.assert_allclose(scale, 1.0 / (n * p[idx]), rtol=1e-6)
    # paired seeds, every pair in ratio 2 (means 4 and 2): each resample's ratio is 2, so is the interval
    ratio, lo, hi = weighting.bootstrap_ratio(np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0]))
    assert ratio == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # unequal pairs: the interval spans the per-seed spread and holds the ratio of means (7/4)
    ratio, lo, hi = weighting.bootstrap_ratio(np.array([1.0, 2.0, 4.0, 7.0]), np.array([1.0, 1.0, 1.0, 4.0]))
    assert ratio == pytest.approx(14.0 / 7.0) and lo < ratio < hi


def test_checkpointing_keys():
    res = checkpointing.run_preset("tiny", batch=8, size=8, repeats=1)
    for name in checkpointing.SETTINGS:
        assert 0.0 < res[f"activation_mem_ratio_{name}"] < 1.0
        assert 0.0 < res[f"recompute_macs_fraction_{name}"] <= 1.0
        assert res[f"step_time_ratio_{name}"] > 0.0
        assert res[f"max_grad_rel_err_{name}"] < 1e-5
    assert res["activation_mem_ratio"] == min(res[f"activation_mem_ratio_{n}"] for n in checkpointing.SETTINGS)


def test_throughput_local_keys():
    res = train_throughput.local_throughput(size=8, batch=8, steps=2, repeats=1, dtype="fp32")
    assert set(res["samples_per_s"]) == {"unified", "unified_fast", "eager"}
    assert res["ratio"] > 0.0 and res["ratio_fast"] > 0.0


def test_eager_twin_matches_the_preset():
    cfg = ModelConfig.preset("tiny", in_channels=3)
    torch.manual_seed(0)
    unified = build_model(cfg)
    eager = build_eager(cfg)
    eager.load_state_dict(eager_state_dict(unified.state_dict()))
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(eager(x), unified(x), atol=1e-5, rtol=1e-5)
    assert not any(type(m).__name__ == "ConvBNAct" for m in fuse_(build_eager(cfg)).modules())  # stays eager
    assert any(type(m).__name__ == "ConvBNAct" for m in fuse_(build_eager(cfg, fusable=True)).modules())


def test_whole_model_case_keys_and_worst_case():
    res = train_throughput.whole_model(["tiny"], [8], repeats=1, compiled=False)
    case = res["whole_model_cases"]["tiny_8x8"]
    assert set(case["samples_per_s"]) == {"eager", "lean", "fast"}
    assert res["whole_model_train_ratio_fast"] == case["train_ratio_fast"] > 0.0
    assert res["whole_model_train_ratio_lean"] == case["train_ratio_lean"] > 0.0
    assert res["whole_model_infer_ratio"] == max(case["infer"][b]["ratio"] for b in ("batch1", "batch32")) > 0.0
    assert "compiled_unified_vs_compiled_eager" not in res
    assert case["infer_form"] == "folded eager (--no-compile)" and "infer_compile_s" not in case
    # lean saves less than fast, which saves no more than eager (whole model: weights included)
    assert 0.0 < case["saved_bytes_ratio_lean"] < case["saved_bytes_ratio_fast"] <= 1.0
    assert res["whole_model_saved_bytes_ratio_lean"] == case["saved_bytes_ratio_lean"]
    assert case["lean_ops_saving_conv_output"] >= 0
