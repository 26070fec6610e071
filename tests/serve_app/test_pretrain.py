"""Pre-training the bandit for an artifact (serve_app/pretrain.py, `tandem pretrain-bandit`) and a replica starting
from the saved policy (ModelUserConfig.bandit_policy)."""

from __future__ import annotations

import pytest
import torch

from serve_app.batching import AdmissionControl, Bandit, BatchingConfig
from serve_app.config import ModelUserConfig
from serve_app.pretrain import PretrainConfig, capacity, measure_service_time, pretrain_bandit
from serve_app.simulator import LinearServiceTime, Sine, simulate
from tandem.cli import main

SERVICE = LinearServiceTime(fixed_s=0.004, per_item_s=0.0004, jitter=0.1)  # capacity ~2.2k items/s at b=64


@pytest.fixture(scope="module")
def trained():
    cfg = PretrainConfig(episodes=18, duration_s=10.0, slo_s=0.1)
    return pretrain_bandit(SERVICE, cfg)


def test_capacity_is_the_best_batch_throughput():
    exact = LinearServiceTime(fixed_s=0.004, per_item_s=0.0004, jitter=0.0)
    assert capacity(exact) == pytest.approx(64 / (0.004 + 0.0004 * 64))
    assert capacity(exact, (1, 2)) == pytest.approx(2 / 0.0048)


def test_load_levels_span_the_models_capacity(trained):
    bandit, curve = trained
    cap = capacity(SERVICE)
    edges = bandit.bandit.rate_edges
    assert len(curve) == 18 and len(edges) == 6
    assert edges[0] == pytest.approx((0.1 + 0.25) / 2 * cap) and edges[-1] == pytest.approx(0.85 * 1.5 * cap)
    visited = [ctx for ctx, row in enumerate(bandit.counts) if sum(row) > 0]
    assert len(visited) >= 5  # every trained load level has data
    assert all(w < 0.1 for w in bandit.bandit.waits_s)


def test_load_levels_span_the_given_rate():
    bandit, _ = pretrain_bandit(SERVICE, PretrainConfig(episodes=2, duration_s=2.0, max_rate=400.0))
    assert bandit.bandit.rate_edges[0] == pytest.approx((0.1 + 0.25) / 2 * 400) and bandit.bandit.rate_edges[-1] == (
        pytest.approx(0.85 * 1.5 * 400)
    )


def test_the_pretrained_policy_beats_an_empty_one(trained):
    """At a load it trained for, greedy: the saved tables against the same bandit with nothing learned."""
    bandit, _ = trained
    blank = Bandit(bandit.config, bandit.bandit)

    def reward(b: Bandit) -> float:
        b.explore = False
        b.reset_window()
        pattern = Sine(0.55 * capacity(SERVICE), 0.5, 10.0)
        r = simulate(b, pattern, SERVICE, duration_s=20.0, seed=99, admission=AdmissionControl(b.config),
                     miss_penalty=b.bandit.miss_penalty)  # fmt: skip
        b.explore = True
        return r.mean_reward

    assert reward(bandit) > reward(blank) + 0.05


def test_a_replica_config_starts_from_the_saved_policy(trained, tmp_path):
    bandit, _ = trained
    path = tmp_path / "policy.json"
    bandit.save(path)
    user = ModelUserConfig(
        artifact="/a", controller="bandit", bandit_policy=str(path), batching={"max_batch_size": 32, "window_s": 0.5}
    )
    ctl = user.build_controller()
    assert isinstance(ctl, Bandit)
    assert ctl.counts == bandit.counts and ctl.values == bandit.values
    assert ctl.config.max_batch_size == 32 and ctl.config.window_s == 0.5  # the replica's config, not the file's
    assert ctl.settings.max_batch_size == ctl.config.initial_batch_size  # not where training ended


def test_bad_policies_are_refused_with_the_reason(trained, tmp_path):
    bandit, _ = trained
    path = tmp_path / "policy.json"
    bandit.save(path)
    batching = {"slo_s": 0.05, "max_wait_s": 0.02}
    other_slo = ModelUserConfig(artifact="/a", controller="bandit", bandit_policy=str(path), batching=batching)
    with pytest.raises(ValueError, match="trained for slo_s=0.1"):
        other_slo.build_controller()
    missing = ModelUserConfig(artifact="/a", controller="bandit", bandit_policy=str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="cannot be read"):
        missing.build_controller()
    for name, text, message in (("bad.json", "{not json", "not JSON"), ("list.json", "[1, 2]", "not a saved bandit")):
        (tmp_path / name).write_text(text)
        user = ModelUserConfig(artifact="/a", controller="bandit", bandit_policy=str(tmp_path / name))
        with pytest.raises(ValueError, match=message):
            user.build_controller()
    with pytest.raises(ValueError, match="only by controller 'bandit'"):
        ModelUserConfig(artifact="/a", controller="slo_model", bandit_policy=str(path))
    with pytest.raises(ValueError, match="episodes"):
        PretrainConfig(episodes=0)
    with pytest.raises(ValueError, match="load_fractions"):
        PretrainConfig(load_fractions=())
    with pytest.raises(ValueError, match="max_rate"):
        PretrainConfig(max_rate=0)


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    from models.artifact import save_artifact
    from models.cnn import ModelConfig, build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "tiny"
    save_artifact(build_model(ModelConfig.preset("tiny", in_channels=1, num_classes=10)), path, input_shape=(1, 8, 8))
    return str(path)


def test_service_time_of_an_artifact(tiny_artifact):
    t = measure_service_time(tiny_artifact, repeats=3)
    assert t.batch_sizes == (1, 2, 4, 8, 16, 32, 64)
    assert all(s > 0 for s in t.seconds) and t.seconds[-1] > t.seconds[0]
    assert 0 <= t.jitter <= 0.5


def test_cli_pretrains_and_serve_checks_the_flag(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["pretrain-bandit", tiny_artifact, "--out", str(out), "--episodes", "3", "--episode-s", "2"]
    argv += ["--max-rate", "300"]
    assert main([*argv, "--slo-ms", "50"]) == 0
    assert "wrote" in capsys.readouterr().out
    batching = {"slo_s": 0.05, "max_wait_s": 0.02}
    user = ModelUserConfig(artifact=tiny_artifact, controller="bandit", bandit_policy=str(out), batching=batching)
    ctl = user.build_controller()
    assert sum(map(sum, ctl.counts)) > 0
    assert main(["pretrain-bandit", tiny_artifact, "--slo-ms", "0"]) == 2
    assert "slo_s" in capsys.readouterr().err
    assert main(["serve", tiny_artifact, "--bandit-policy", str(out)]) == 2  # needs --controller bandit
    assert "--controller bandit" in capsys.readouterr().err


def test_pretraining_uses_the_batching_config_tandem_serve_deploys(trained):
    """Same SLO-derived waits as `tandem serve --slo-ms 100`, so the policy's arms are ones the replica can use."""
    from tandem.cli import build_parser
    from tandem.cli_serve import deploy_config

    args = build_parser().parse_args(["serve", "/a", "--slo-ms", "100", "--controller", "bandit"])
    served = BatchingConfig.from_dict(deploy_config(args).app["batching"])
    bandit, _ = trained
    assert bandit.config == served
