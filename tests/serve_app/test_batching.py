"""Batching controllers and admission control, alone and in the simulated batching server."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from serve_app.batching import (
    AIMD,
    AdmissionControl,
    Bandit,
    BanditConfig,
    BatchingConfig,
    LatencyCalibration,
    ServiceTimeFit,
    SLOModel,
    Static,
    Verdict,
    WindowRecorder,
    WindowStats,
)
from serve_app.simulator import Constant, LinearServiceTime, Sine, simulate, train_bandit

SLO = 0.1
# Per-batch time t(b) = 10 ms + 0.5 ms * b (10% log-normal noise): Serve's default cap of 10 holds 667 req/s.
SERVICE = LinearServiceTime(fixed_s=0.010, per_item_s=0.0005, jitter=0.1)
SINE = Sine(mean=500.0, swing=0.5, period_s=10.0)  # 250..750 req/s


def window(**kw) -> WindowStats:
    kw.setdefault("duration_s", 1.0)
    kw.setdefault("arrivals", 100)
    kw.setdefault("queue_len", 0)
    return WindowStats(**kw)


def test_controllers_and_simulator_need_neither_ray_nor_torch():
    code = "import sys, serve_app.batching, serve_app.simulator; assert not {'ray', 'torch'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kw",
    [
        {"slo_s": 0.0},
        {"quantile": 1.0},
        {"window_s": -1.0},
        {"min_batch_size": 0},
        {"max_batch_size": 4, "min_batch_size": 8, "initial_batch_size": 8},
        {"max_batch_size": 2.5},
        {"max_wait_s": 0.1, "slo_s": 0.1},  # a wait alone would break the SLO
        {"initial_batch_size": 100},
        {"initial_wait_s": 0.06},
        {"max_queue_len": 0},
        {"target_utilization": 1.5},
    ],
)
def test_bad_batching_config_raises(kw):
    with pytest.raises(ValueError, match="must be"):
        BatchingConfig(**kw)


def test_config_from_dict_refuses_unknown_keys():
    assert BatchingConfig.from_dict({"slo_s": 0.05, "max_wait_s": 0.01}).slo_s == 0.05
    with pytest.raises(ValueError, match="unknown \\['slo_ms'\\]"):
        BatchingConfig.from_dict({"slo_ms": 100})


@pytest.mark.parametrize(
    "make",
    [
        lambda: BanditConfig(batch_sizes=()),
        lambda: BanditConfig(waits_s=(-0.01,)),
        lambda: BanditConfig(rate_edges=(100.0, 50.0)),
        lambda: BanditConfig(epsilon=0.1, min_epsilon=0.2),
        lambda: Bandit(BatchingConfig(slo_s=0.01, max_wait_s=0.005, initial_wait_s=0.005), BanditConfig()),
        lambda: AIMD(step=0),
        lambda: AIMD(backoff=1.0),
        lambda: SLOModel(min_safety=0.0),
    ],
)
def test_bad_controller_arguments_raise(make):
    with pytest.raises(ValueError, match="must be"):
        make()


# ------------------------------------------------------------------------------------------ observations


def test_recorder_closes_windows_and_resets():
    rec = WindowRecorder(start=10.0)
    for _ in range(9):
        rec.arrival()
    rec.rejected()
    rec.batch_start(4)
    assert rec.queue_len == 4  # 9 arrived, 1 refused, 4 executing
    rec.batch_end(4, 0.02)
    for x in (0.01, 0.02, 0.03, 0.2):
        rec.done(x)
    s = rec.close(now=10.5)
    assert (s.duration_s, s.arrivals, s.queue_len, s.rejected) == (0.5, 9, 4, 1)
    assert s.arrival_rate == 18.0
    assert list(s.batch_sizes) == [4] and list(s.service_times_s) == [0.02]
    assert s.latency_quantile(0.5) == 0.02 and s.latency_quantile(0.99) == 0.2
    assert s.slo_misses(0.1) == 2  # one late completion + one rejection
    empty = rec.close(now=11.0)
    assert (empty.duration_s, empty.arrivals, empty.queue_len, empty.latency_quantile(0.99)) == (
        0.5,
        0,
        4,
        None,
    )


def test_fit_recovers_linear_service_time():
    fit = ServiceTimeFit()
    sizes = [1, 2, 4, 8, 16, 32] * 10
    fit.observe(sizes, [0.005 + 0.0007 * b for b in sizes])
    assert fit.a == pytest.approx(0.005, abs=1e-9) and fit.c == pytest.approx(0.0007, abs=1e-9)
    assert fit.noise_quantile(0.99) == pytest.approx(1.0)
    fit.observe([10] * 40, [0.012] * 40)  # the batches now running are of 10
    assert fit.drain_time(25, 10, 0.99) == pytest.approx(3 * fit.mean(10) + fit.mean(5))


def test_fit_with_one_batch_size_assumes_proportional_time():
    fit = ServiceTimeFit()
    fit.observe([8] * 20, [0.016] * 20)
    assert (fit.a, fit.c) == (0.0, pytest.approx(0.002))


def test_per_batch_observations_are_not_counted_twice():
    ctl = SLOModel(BatchingConfig(slo_s=SLO))
    ctl.observe_batch(4, 0.02)
    assert ctl.fit.ready  # learns at once, before any window closes
    ctl.update(window(batch_sizes=[4] * 10, service_times_s=[0.5] * 10))
    assert ctl.fit.mean(4) == pytest.approx(0.02)  # the window repeats what observe_batch reported
    ctl.update(window(batch_sizes=[4], service_times_s=[0.04]))  # nothing reported since: learn from stats
    assert ctl.fit.mean(4) > 0.02


def test_fit_forgets_an_old_model():
    fit = ServiceTimeFit(decay=0.99)
    sizes = [1, 4, 16] * 300
    fit.observe(sizes, [0.010 + 0.001 * b for b in sizes])
    fit.observe(sizes, [0.002 + 0.004 * b for b in sizes])
    assert fit.a == pytest.approx(0.002, rel=0.01) and fit.c == pytest.approx(0.004, rel=0.01)


# ---------------------------------------------------------------------------------------------- controllers


def test_static_never_changes():
    ctl = Static.serve_defaults()
    assert (ctl.settings.max_batch_size, ctl.settings.batch_wait_timeout_s) == (10, 0.01)
    s = ctl.update(window(batch_sizes=[10] * 50, service_times_s=[0.5] * 50, latencies_s=[5.0] * 500))
    assert (s.max_batch_size, s.batch_wait_timeout_s) == (10, 0.01)


def test_aimd_grows_additively_and_backs_off_multiplicatively():
    ctl = AIMD(BatchingConfig(slo_s=SLO), step=2, backoff=0.5)
    fast_full = window(batch_sizes=[10, 10, 3], service_times_s=[0.02, 0.02, 0.01])
    assert ctl.update(fast_full).max_batch_size == 12
    assert ctl.update(window(batch_sizes=[12, 5], service_times_s=[0.02, 0.01])).max_batch_size == 14
    not_full = window(batch_sizes=[3, 5], service_times_s=[0.01, 0.01])
    assert ctl.update(not_full).max_batch_size == 14  # no growth when no batch reached the cap
    slow = window(batch_sizes=[14], service_times_s=[0.06])  # > SLO / 2
    assert ctl.update(slow).max_batch_size == 7
    assert ctl.update(window()).max_batch_size == 7  # nothing ran: no evidence either way
    assert ctl.settings.batch_wait_timeout_s == 0.01


def test_aimd_in_the_simulator_grows_under_load_and_backs_off_from_slow_batches():
    grow = AIMD(BatchingConfig(slo_s=SLO))
    r = simulate(grow, Constant(800.0), SERVICE, duration_s=20.0, seed=0)
    sizes = [w.settings.max_batch_size for w in r.windows]
    assert sizes[0] == 11 and sizes[-1] >= 25 and sizes == sorted(sizes)
    slow = LinearServiceTime(fixed_s=0.03, per_item_s=0.003, jitter=0.05)  # t(10) = 60 ms > SLO / 2
    back = AIMD(BatchingConfig(slo_s=SLO))
    r = simulate(back, Constant(300.0), slow, duration_s=20.0, seed=0)
    sizes = [w.settings.max_batch_size for w in r.windows]
    assert sizes[0] == 9 and 4 <= min(sizes) and max(sizes[5:]) <= 7


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slo_model_holds_p99_under_sine_swing_where_serve_defaults_do_not(seed):
    cfg = BatchingConfig(slo_s=SLO)
    static = simulate(Static.serve_defaults(slo_s=SLO), SINE, SERVICE, duration_s=30.0, seed=seed)
    ctl = SLOModel(cfg)
    adaptive = simulate(ctl, SINE, SERVICE, duration_s=30.0, seed=seed)
    assert static.arrivals == adaptive.arrivals  # same arrivals
    assert static.p99_s > 1.5 * SLO
    assert adaptive.p99_s <= SLO
    assert adaptive.rejected == 0 and adaptive.attainment >= 0.99
    # the batches formed follow the load: larger at the sine's peaks than in its troughs
    assert max(adaptive.batch_sizes) > 3 * (sum(adaptive.batch_sizes) / len(adaptive.batch_sizes))
    assert all(w.settings.batch_wait_timeout_s < SLO for w in adaptive.windows)


def test_slo_model_waits_when_the_model_call_does_not_block():
    # The handler awaits the model: Ray closes batches while one executes, so batches only grow by waiting.
    def run(mean: float, blocks: bool):
        ctl = SLOModel(BatchingConfig(slo_s=SLO, model_blocks_loop=blocks))
        gate = AdmissionControl(ctl.config)
        return simulate(ctl, Sine(mean=mean), SERVICE, duration_s=30.0, seed=0, admission=gate, handler="awaiting")

    light, heavy = run(100.0, blocks=False), run(300.0, blocks=False)
    assert light.p99_s <= SLO and heavy.p99_s <= SLO and heavy.attainment >= 0.99

    def mean_wait(r) -> float:
        return sum(w.settings.batch_wait_timeout_s for w in r.windows) / len(r.windows)

    assert 0 < mean_wait(light) < mean_wait(heavy) < SLO / 2
    assert max(w.settings.batch_wait_timeout_s for w in heavy.windows) <= BatchingConfig().max_wait_s
    wrong = run(300.0, blocks=True)  # assumes a blocking call: no wait, batches of one, a backlog
    assert wrong.attainment < 0.9


def test_slo_model_cap_follows_the_slo_and_the_fit():
    def cap(slo_s: float, a: float, c: float) -> int:
        ctl = SLOModel(BatchingConfig(slo_s=slo_s, max_wait_s=0.0, initial_wait_s=0.0, max_batch_size=256))
        sizes = [1, 8, 32] * 10
        return ctl.update(window(batch_sizes=sizes, service_times_s=[a + c * b for b in sizes])).max_batch_size

    # worst case 2 * t(b) <= SLO: b <= (SLO / 2 - a) / c
    assert cap(0.1, 0.01, 0.0009) == 44
    assert cap(0.05, 0.01, 0.0009) == 16
    assert cap(0.1, 0.01, 0.0018) == 22


def test_slo_model_tightens_after_a_miss():
    ctl = SLOModel(BatchingConfig(slo_s=SLO))
    sizes = [1, 8, 32] * 10
    ok = window(batch_sizes=sizes, service_times_s=[0.01 + 0.001 * b for b in sizes], latencies_s=[0.05] * 100)
    before = ctl.update(ok).max_batch_size
    missed = window(batch_sizes=sizes, service_times_s=[0.01 + 0.001 * b for b in sizes], latencies_s=[0.2] * 100)
    after = ctl.update(missed).max_batch_size
    assert ctl.safety < 1.0 and after < before


# ------------------------------------------------------------------------------------------------ admission


def admission_setup(max_queue_len: int | None = 256) -> tuple[AdmissionControl, Static]:
    cfg = BatchingConfig(slo_s=SLO, max_queue_len=max_queue_len)
    ctl = Static(cfg)
    sizes = [1, 10] * 20 + [10] * 40  # lately full batches of 10
    ctl.update(window(batch_sizes=sizes, service_times_s=[0.01 + 0.001 * b for b in sizes]))
    return AdmissionControl(cfg), ctl


def test_admission_predicts_latency_and_rejects_with_retry_after():
    gate, ctl = admission_setup()
    v = gate.check(0, ctl)  # a full batch (20 ms) is running, then this one alone (11 ms)
    assert v.admitted and v.predicted_latency_s == pytest.approx(0.031)
    v = gate.check(50, ctl)  # 1 running + 5 full batches ahead + itself = 131 ms > 100 ms
    assert not v.admitted and v.predicted_latency_s == pytest.approx(0.131)
    assert v.retry_after_s == pytest.approx(0.12) and v.retry_after_header() == "1"
    assert "SLO" in v.reason


def test_admission_bounds_the_queue():
    gate, ctl = admission_setup(max_queue_len=3)
    assert gate.check(2, ctl).admitted
    v = gate.check(3, ctl)
    assert not v.admitted and "queue full" in v.reason


def test_admission_admits_everything_before_the_first_observation():
    cfg = BatchingConfig(slo_s=SLO)
    v = AdmissionControl(cfg).check(200, SLOModel(cfg))
    assert v.admitted and v.predicted_latency_s is None


def test_admission_keeps_goodput_under_overload():
    # Sine mean 1000 req/s: the peaks exceed even the largest cap that fits the SLO.
    overload = Sine(mean=1000.0, swing=0.5, period_s=10.0)
    static = simulate(Static.serve_defaults(slo_s=SLO), overload, SERVICE, duration_s=30.0, seed=0)
    ctl = SLOModel(BatchingConfig(slo_s=SLO))
    guarded = simulate(ctl, overload, SERVICE, duration_s=30.0, seed=0, admission=AdmissionControl(ctl.config))
    assert guarded.rejected > 0 and guarded.attainment >= 0.9
    assert guarded.goodput_rps > 2 * static.goodput_rps  # the unbounded static queue collapses
    assert guarded.p99_s <= SLO  # what it admits, it serves within the SLO


def test_the_liveness_rule_is_the_replicas_in_the_simulator_too():
    """AdmissionControl.refuses, which ModelServer.infer and simulate both call: a refused verdict refuses only
    with something queued or the event loop far behind, and never in an update's grace period."""
    gate = AdmissionControl(BatchingConfig(slo_s=SLO))
    no = Verdict(False, 1.0, 1.0, 1.0, "predicted latency 1000 ms > SLO 100 ms")
    assert not gate.refuses(no, 0)  # nothing queued: admitting protects the prediction's chance to correct
    assert gate.refuses(no, 1) and gate.refuses(no, 0, lag_s=0.6 * SLO)
    assert not gate.refuses(no, 0, lag_s=0.4 * SLO) and not gate.refuses(no, 5, in_grace=True)
    assert not gate.refuses(Verdict(True, 0.01, 0.01), 5)
    # A gate whose SLO no batch can meet, at 5 req/s against ~10 ms batches: the queue is empty at every arrival,
    # so the simulator, like the replica, refuses none (it refused every one before it ran the rule).
    ctl = SLOModel(BatchingConfig(slo_s=SLO))
    strict = AdmissionControl(BatchingConfig(**BatchingConfig.slo_fields(0.001)))
    res = simulate(ctl, Constant(5.0), SERVICE, duration_s=20.0, seed=0, admission=strict)
    assert res.rejected == 0 and len(res.latencies_s) >= 80
    busy = simulate(ctl, Constant(400.0), SERVICE, duration_s=5.0, seed=0, admission=strict)
    assert busy.rejected > 0  # with a queue it does refuse


def test_one_batching_policy_counts_refuses_calibrates_and_survives_a_controller_swap():
    """BatchingPolicy, the object both ModelServer and simulate drive: arrivals ask the gate with the queue as it
    stands and apply the liveness rule (only when enforced), batches teach the controller's fit, answers feed the
    calibration (only when asked to), and a swapped-in controller keeps the queue count."""
    from serve_app.batching import BatchingPolicy

    ctl = SLOModel(BatchingConfig(**BatchingConfig.slo_fields(0.001)))  # an SLO no batch meets
    pol = BatchingPolicy(ctl, calibrate=True)
    for _ in range(3):
        assert all(pol.arrive(in_grace=True).admitted for _ in range(4))  # just updated: admits all
        pol.batch_start(4)
        pol.batch_end(4, 0.01)
        for _ in range(4):
            pol.done(0.02)  # no verdict: nothing to calibrate
    assert ctl.fit.ready and pol.queue_len == 0 and pol.admission.calibration.samples == 0
    pol.tick(0.5)
    first, second = pol.arrive(), pol.arrive()
    assert first.admitted and not first.verdict.admitted  # nothing queued: the liveness rule admits
    assert not second.admitted and pol.queue_len == 1  # one queued: refused, not counted as queued
    assert not pol.arrive(in_grace=False).admitted and pol.arrive(in_grace=True).admitted
    for _ in range(60):
        pol.done(0.05, first.verdict)
    assert pol.admission.calibration.samples == 60
    pol.replace(Static(BatchingConfig(slo_s=SLO)), enforce=False)
    assert pol.queue_len == 2 and pol.admission.calibration.samples == 0 and pol.arrive().admitted
    stats, settings = pol.tick(1.0)
    assert (stats.arrivals, stats.rejected, stats.queue_len) == (5, 2, 3) and settings == pol.settings
    off = BatchingPolicy(SLOModel(BatchingConfig(slo_s=SLO)), calibrate=False)
    off.done(0.05, Verdict(True, 0.01, 0.01))
    assert off.admission.calibration.samples == 0
    with pytest.raises(TypeError, match="controller must be a Controller"):
        BatchingPolicy(object())


# --------------------------------------------------------------------------------------------------- bandit


def small_bandit(seed: int = 0) -> Bandit:
    return Bandit(
        BatchingConfig(slo_s=SLO, window_s=0.5),
        BanditConfig(
            batch_sizes=(1, 4, 8, 16, 32),
            waits_s=(0.0, 0.005, 0.01),
            rate_edges=(150.0, 300.0, 450.0, 600.0, 750.0),
            seed=seed,
        ),
    )


def evaluate(bandit: Bandit, seed: int = 100):
    bandit.explore = False
    bandit.reset_window()
    r = simulate(
        bandit,
        SINE,
        SERVICE,
        duration_s=20.0,
        seed=seed,
        admission=AdmissionControl(bandit.config),
        miss_penalty=bandit.bandit.miss_penalty,
    )
    bandit.explore = True
    return r


def test_bandit_improves_its_reward_over_training():
    bandit = small_bandit()
    before = evaluate(bandit)
    curve = train_bandit(
        bandit,
        [(SINE, SERVICE)],
        episodes=15,
        duration_s=20.0,
        seed=1,
        admission=AdmissionControl(bandit.config),
    )
    assert sum(map(sum, bandit.counts)) == 16 * 39  # one credit per window but each episode's first
    after = evaluate(bandit)
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 0.1
    assert after.mean_reward > before.mean_reward + 0.1
    assert after.attainment >= 0.99 and after.p99_s <= SLO


def test_bandit_save_load_round_trip(tmp_path):
    bandit = small_bandit(seed=3)
    train_bandit(bandit, [(SINE, SERVICE)], episodes=2, duration_s=10.0, seed=5)
    path = tmp_path / "bandit.json"
    bandit.save(path)
    assert json.loads(path.read_text())["format"] == "tandem.bandit/1"  # plain JSON, no pickle
    loaded = Bandit.load(path)
    assert loaded.to_dict() == bandit.to_dict()
    # same state, same future: identical decisions (explorations included) on the same observations
    for rate in (100, 320, 480, 700, 900) * 4:
        stats = window(
            duration_s=0.5,
            arrivals=rate // 2,
            batch_sizes=[4],
            service_times_s=[0.012],
            latencies_s=[0.02] * (rate // 2),
        )
        assert loaded.update(stats) == bandit.update(stats)


def test_bandit_load_rejects_foreign_state(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match="must be 'tandem.bandit/1'"):
        Bandit.load(path)
    d = small_bandit().to_dict()
    d["counts"] = d["counts"][:-1]
    with pytest.raises(ValueError, match="counts must have shape"):
        Bandit.from_dict(d)


# ---------------------------------------------------------------------------------------- latency calibration


def test_calibration_is_identity_until_fed_then_learns_overhead_and_stretch():
    cal = LatencyCalibration(decay=1.0, min_samples=10)
    assert cal(0.02) == 0.02
    rng = random.Random(0)
    for _ in range(200):  # observed = 3 * predicted + 5 ms
        x = rng.uniform(0.001, 0.03)
        cal.observe(x, 3 * x + 0.005)
    assert cal.alpha == pytest.approx(3.0) and cal.beta == pytest.approx(0.005)
    assert cal(0.02) == pytest.approx(0.065)


def test_calibration_never_predicts_below_the_batch_model():
    cal = LatencyCalibration(decay=1.0, min_samples=10)
    for i in range(50):  # observed faster than predicted: clamped to the identity
        x = 0.001 * (i + 1)
        cal.observe(x, 0.5 * x)
    assert cal.alpha == 1.0 and cal.beta == 0.0 and cal(0.04) == 0.04
    flat = LatencyCalibration(decay=1.0, min_samples=10)
    for _ in range(50):  # one predicted value only: the overhead is the mean difference
        flat.observe(0.002, 0.010)
    assert flat.alpha == 1.0 and flat.beta == pytest.approx(0.008)


def test_admission_uses_the_calibrated_prediction():
    gate, ctl = admission_setup()
    assert gate.check(10, ctl).admitted  # 1 running + 1 full batch + itself = 51 ms on the batch model
    for _ in range(60):
        gate.calibration.observe(0.01, 0.07)  # every request took 60 ms more than predicted
    v = gate.check(10, ctl)
    assert not v.admitted and v.model_latency_s == pytest.approx(0.051)
    assert v.predicted_latency_s == pytest.approx(0.111)


def test_admission_adds_the_wait_the_queue_does_not_show():
    gate, ctl = admission_setup()
    assert gate.check(10, ctl).admitted  # 51 ms predicted
    v = gate.check(10, ctl, waited_s=0.06)  # the replica's event loop is 60 ms behind
    assert not v.admitted and v.predicted_latency_s == pytest.approx(0.111)


def test_calibration_forgets_an_overload_within_seconds():
    """After an overload (every request 10x the prediction) the load drops: with no samples the calibration is
    the identity again within ~2 half-lives, and normal samples take alpha back near 1 as quickly; alpha never
    exceeds its cap meanwhile."""
    now = [0.0]
    cal = LatencyCalibration(min_samples=20, half_life_s=1.0, clock=lambda: now[0])
    for i in range(300):
        now[0] = i * 0.01
        x = 0.001 * (1 + i % 20)
        cal.observe(x, 10 * x)
    assert cal.alpha == cal.max_alpha == 4.0
    now[0] += 4.0  # quiet: 300 samples' weight fades below min_samples
    assert cal(0.02) == 0.02
    idle = LatencyCalibration(min_samples=20, half_life_s=1.0, clock=lambda: now[0])
    for i in range(300):
        now[0] = i * 0.01
        idle.observe(0.001 * (1 + i % 20), 0.01 * (1 + i % 20))
    for i in range(400):  # then normal traffic at 100/s
        now[0] = 3.0 + i * 0.01
        x = 0.001 * (1 + i % 20)
        idle.observe(x, 1.1 * x)
        if i == 199:
            assert idle.alpha < 2.0  # 2 s after the overload
    assert idle.alpha < 1.2  # 4 s after


def test_model_queue_takes_the_oldest_up_to_the_cap_in_force_and_skips_the_cancelled():
    from serve_app.batching import BatchingPolicy, ModelQueue

    ctl = Static(BatchingConfig(initial_batch_size=3, initial_wait_s=0.0))
    policy = BatchingPolicy(ctl)
    for _ in range(7):
        assert policy.arrive().admitted
    q = ModelQueue(policy, skip=lambda i: i == 1)
    q.put([0, 1, 2])
    q.put([3, 4, 5, 6])  # closed batches merge: the next forward is not bound to one of them
    policy.cancelled()  # request 1's client left (the replica counts it out then; the queue skips it)
    assert q.take() == [0, 2, 3] and policy.queue_len == 7 - 1 - 3
    policy.replace(Static(BatchingConfig(initial_batch_size=2)))  # a hot update's cap: from the next forward
    assert q.take() == [4, 5] and q.take() == [6] and q.take() == [] and len(q) == 0 and policy.queue_len == 0
    with pytest.raises(TypeError, match="policy must be a BatchingPolicy"):
        ModelQueue(ctl)
