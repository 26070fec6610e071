"""bench/serving.py's analysis on fakes (no Ray, no HTTP): the held-rate search and the saturated cost model."""

from __future__ import annotations

import pytest

from bench.serving import (
    fit_cost_model,
    held_brackets,
    loses_nothing,
    mean_batch_between,
    ratio,
    saturated_cost_model,
    search_held,
    sustained_rounds,
)


def fake_measure(capacity: dict[str, float], calls: list[tuple[str, float]]):
    """A variant holds every rate up to its capacity (attainment 1.0) and none above (0.5)."""

    def measure(v: str, m: float) -> dict:
        calls.append((v, m))
        return {"slo_attainment": 1.0 if m <= capacity[v] + 1e-12 else 0.5}

    return measure


def test_a_variant_that_holds_only_rates_below_the_grid_still_gets_its_rate():
    calls: list[tuple[str, float]] = []
    caps = {"static": 0.6, "adaptive": 1.2}  # static fails the grid's lowest rate (1.0x)
    held, runs = search_held(list(caps), [1.0, 1.5, 2.0], fake_measure(caps, calls), 2, descend=3, refine=0)
    assert held == {"static": 0.5, "adaptive": 1.0}
    # static: the grid's 1.0 failed, so it was run at 0.5 (held); adaptive was not run below the grid
    assert [m for v, m in calls if v == "static"] == [1.0, 1.0, 0.5, 0.5]
    assert ("adaptive", 0.5) not in runs


def test_bisection_narrows_each_variants_bracket_and_stays_within_its_capacity():
    calls: list[tuple[str, float]] = []
    caps = {"static": 0.6, "adaptive": 1.2}
    held, _ = search_held(list(caps), [1.0, 1.5, 2.0], fake_measure(caps, calls), 1, descend=3, refine=3)
    # static's bracket (0.5, 1.0) -> 0.75 fails -> 0.625 fails -> 0.5625 held; adaptive's (1.0, 1.5) -> 1.25
    # fails -> 1.125 held -> 1.1875 held
    assert held == {"static": 0.5625, "adaptive": 1.1875}
    assert all(held[v] <= caps[v] for v in caps)


def test_each_held_rate_comes_with_the_lowest_rate_that_failed_above_it():
    caps = {"static": 0.6, "adaptive": 1.2, "top": 9.0}
    held, runs = search_held(list(caps), [1.0, 1.5, 2.0], fake_measure(caps, []), 1, descend=3, refine=2)
    # in requests/s at a capacity of 100/s: static held 0.5x, failed 0.75x then 0.625x; nothing ran above 2.0x
    got = held_brackets({v: m * 100 for v, m in held.items()}, runs, 100.0)
    assert got == {"static": [50.0, 62.5], "adaptive": [112.5, 125.0], "top": [200.0, None]}


def test_steps_are_interleaved_across_variants_repeat_by_repeat():
    calls: list[tuple[str, float]] = []
    caps = {"a": 0.3, "b": 0.3}
    search_held(["a", "b"], [1.0, 2.0], fake_measure(caps, calls), 2, descend=2, refine=0)
    # at every step the variants alternate within each repeat: a, b, a, b
    assert calls == [("a", 1.0), ("b", 1.0), ("a", 1.0), ("b", 1.0),
                     ("a", 0.5), ("b", 0.5), ("a", 0.5), ("b", 0.5),
                     ("a", 0.25), ("b", 0.25), ("a", 0.25), ("b", 0.25)]  # fmt: skip


def test_the_overload_point_runs_for_every_variant_and_a_lucky_pass_above_a_failure_does_not_count():
    calls: list[tuple[str, float]] = []

    def measure(v: str, m: float) -> dict:
        calls.append((v, m))
        return {"slo_attainment": 1.0 if v == "b" or m != 2.0 else 0.0}  # a fails 2.0 only

    held, runs = search_held(["a", "b"], [1.0, 2.0, 3.0, 4.0], measure, 1, always=4.0, descend=0, refine=0)
    assert held == {"a": 1.0, "b": 4.0}
    assert ("a", 3.0) not in runs and ("a", 4.0) in runs


def test_a_lossless_criterion_fails_a_rate_where_one_repeat_lost_a_request_however_high_its_attainment():
    lost = {0.5: [0, 0], 1.0: [0, 1], 2.0: [0, 0]}  # 1.0x: one repeat lost a request; 2.0x (a lucky pass) is not run

    def measure(v: str, m: float) -> dict:
        n = sum(1 for k in calls if k == m)
        calls.append(m)
        return {"slo_attainment": 0.999, "sent": 1000, "ok": 1000 - lost[m][n]}

    calls: list[float] = []
    held, runs = search_held(["a"], [0.5, 1.0, 2.0], measure, 2, descend=0, refine=0, holds=loses_nothing)
    assert held == {"a": 0.5}
    assert calls == [0.5, 0.5, 1.0, 1.0]
    # by the default criterion (median attainment >= 99%) the same runs hold every rate
    calls.clear()
    assert search_held(["a"], [0.5, 1.0, 2.0], measure, 2, descend=0, refine=0)[0] == {"a": 2.0}


def test_nothing_held_down_to_the_floor_is_zero_and_bad_arguments_are_refused():
    held, _ = search_held(["a"], [1.0], fake_measure({"a": 0.01}, []), 1, descend=2, refine=2)
    assert held == {"a": 0.0}
    with pytest.raises(ValueError, match="repeats must be"):
        search_held(["a"], [1.0], fake_measure({"a": 1.0}, []), 0)
    with pytest.raises(ValueError, match="mults must be"):
        search_held(["a"], [2.0, 1.0], fake_measure({"a": 1.0}, []), 1)


def test_the_cost_fit_recovers_per_request_and_per_forward_costs_from_synthetic_points():
    o, a = 0.9, 0.8  # ms

    def ms(b: float) -> float:
        return o + a / b

    m = fit_cost_model({"nobatch": (ms(1), 1.0), "static_default": (ms(10), 10.0), "adaptive": (ms(24), 24.0)})
    assert m["per_request_ms"] == pytest.approx(o) and m["per_forward_ms"] == pytest.approx(a)
    # batching without bound against static's batches of 10: (0.9 + 0.08) / 0.9
    assert m["ratio_ceiling_vs_static"] == pytest.approx((o + a / 10) / o)
    assert m["fitted_ms_per_request"]["adaptive"] == pytest.approx(o + a / 24)


def test_the_cost_fit_is_least_squares_and_says_when_it_cannot_fit():
    # noisy points: the fit minimises the squared residuals (perturbing it only makes them larger)
    pts = {"a": (1.8, 1.0), "b": (0.95, 10.0), "c": (0.90, 30.0)}
    m = fit_cost_model(pts, static="b")

    def sse(o: float, a: float) -> float:
        return sum((ms - o - a / b) ** 2 for ms, b in pts.values())

    best = sse(m["per_request_ms"], m["per_forward_ms"])
    for do, da in ((0.01, 0), (-0.01, 0), (0, 0.01), (0, -0.01)):
        assert sse(m["per_request_ms"] + do, m["per_forward_ms"] + da) > best
    assert fit_cost_model({"a": (2.0, 10.0), "b": (1.6, 10.0)}) is None  # one batch size: no slope
    # a batched variant far cheaper than the model allows: O comes out <= 0 and no ceiling is claimed
    assert fit_cost_model({"nobatch": (10.0, 1.0), "static_default": (0.1, 10.0)})["ratio_ceiling_vs_static"] is None


def sat_points(cpu: dict[str, float] | None = None) -> dict[str, dict]:
    """Saturated points on a 2-core machine with O = 0.9 ms and A = 0.8 ms of CPU; static leaves 20% of the
    cores idle (its batch wait), so it serves less than its CPU cost allows."""
    out = {}
    for v, b, busy in (("nobatch", 1, 2.0), ("static_default", 10, 1.6), ("adaptive", 32, 2.0)):
        cpu_ms = 0.9 + 0.8 / b
        out[v] = {"peak_rps": busy * 1e3 / cpu_ms, "mean_batch": None, "batch_cap": b,
                  "peak_cpu_cores": busy if cpu is None else cpu[v]}  # fmt: skip
    return out


def test_the_saturated_model_falls_back_to_caps_and_its_cpu_ceiling_sees_a_variant_leaving_cores_idle():
    sat = sat_points()
    model, ceiling = saturated_cost_model(sat, cores=2)
    # no batch counters: only the variants whose configuration fixes the batch (nobatch 1, static's cap 10) are
    # fitted; the CPU fit recovers O and A
    assert model["mean_batch_source"].startswith("configuration")
    assert model["mean_batch"] == {"nobatch": 1, "static_default": 10}
    assert model["cpu"]["per_request_ms"] == pytest.approx(0.9)
    assert model["cpu"]["per_forward_ms"] == pytest.approx(0.8)
    # the most any batching serves: 2 cores at 0.9 ms over static's measured rate (1.6 cores at 0.98 ms)
    assert model["ceiling_basis"] == "cpu"
    assert ceiling == pytest.approx((2e3 / 0.9) / (1.6e3 / 0.98))
    # the wall-clock fit, blind to static's idle cores, claims a lower ceiling than adaptive already reaches
    measured = sat["adaptive"]["peak_rps"] / sat["static_default"]["peak_rps"]
    assert model["wall"]["ratio_ceiling_vs_static"] < measured < ceiling
    # and names the variant it measured below its per-request floor; the CPU fit has none there
    assert model["wall"]["below_floor"] == ["adaptive"] and model["cpu"]["below_floor"] == []
    # by default the cores are the most any variant kept busy (2.0 here: nobatch and adaptive), not the machine's
    model, default = saturated_cost_model(sat)
    assert model["cpu"]["cores"] == 2.0 and default == pytest.approx(ceiling)


def test_without_batch_counters_an_adaptive_variant_far_under_its_cap_does_not_bend_the_fit():
    sat = sat_points()
    sat["adaptive"]["peak_rps"] = 2e3 / (0.9 + 0.8 / 3)  # batches of 3, cap 32
    model, _ = saturated_cost_model(sat, cores=2)
    assert model["cpu"]["per_request_ms"] == pytest.approx(0.9)
    assert model["cpu"]["per_forward_ms"] == pytest.approx(0.8)


def test_mean_batch_comes_from_the_replicas_batch_counters_when_it_counts_them():
    before = {"batches": {1: 5, 10: 2}, "max_batch_size": 10}
    after = {"batches": {1: 5, 10: 12, 4: 5}, "max_batch_size": 10}
    assert mean_batch_between(before, after) == pytest.approx((10 * 10 + 4 * 5) / 15)
    assert mean_batch_between(before, before) is None and mean_batch_between(None, after) is None
    sat = sat_points()
    for v, b in (("nobatch", 1.0), ("static_default", 9.0), ("adaptive", 20.0)):
        sat[v]["mean_batch"] = b
    model, _ = saturated_cost_model(sat, cores=2)
    assert model["mean_batch_source"] == "replica batch_stats" and model["mean_batch"]["adaptive"] == 20.0
    del sat["adaptive"]["peak_cpu_cores"]  # no CPU recorded: the wall fit's ceiling is the headline
    model, ceiling = saturated_cost_model(sat, cores=2)
    assert model["cpu"] is None and ceiling == model["wall"]["ratio_ceiling_vs_static"]


def test_overload_rounds_count_only_where_the_generator_keeps_up_and_step_down_until_it_does():
    calls: list[tuple[str, float]] = []

    def generate(v: str, mult: float) -> dict:  # the generator lags 30 ms above 1.1x, 2 ms below
        calls.append((v, mult))
        return {"variant": v, "send_lag_p99_ms": 30.0 if mult > 1.1 else 2.0}

    mult, runs, thrown = sustained_rounds(["static_default", "adaptive"], 2, generate, 10.0, (1.5, 1.25, 1.0))
    assert mult == 1.0  # 1.5 and 1.25 lag (each thrown away after its first round)
    assert {v: len(rs) for v, rs in runs.items()} == {"static_default": 2, "adaptive": 2}
    assert all(r["send_lag_p99_ms"] <= 10.0 for rs in runs.values() for r in rs) and len(thrown) == 4
    assert calls[-4:] == [("static_default", 1.0), ("adaptive", 1.0)] * 2  # interleaved at the final rate


def test_a_lagging_round_after_good_ones_throws_the_rate_away_and_the_last_rate_counts_anyway():
    lags = iter([1.0, 50.0, 50.0, 50.0])  # round 1 at 1.5 fine, round 2 lags; 1.0 lags too
    mult, runs, thrown = sustained_rounds(["a"], 2, lambda v, m: {"send_lag_p99_ms": next(lags)}, 10.0, (1.5, 1.0))
    assert mult == 1.0 and len(thrown) == 2
    assert [r["send_lag_p99_ms"] for r in runs["a"]] == [50.0, 50.0]  # counted; the caller reports not sustained


def test_saturated_reads_each_repeats_fastest_point_and_caps_batches_at_its_connections(monkeypatch):
    from bench import serving

    rps = {("static_default", 8): 480.0, ("static_default", 16): 1010.0, ("static_default", 32): 950.0,
           ("adaptive", 8): 830.0, ("adaptive", 16): 1020.0, ("adaptive", 32): 1150.0}  # fmt: skip
    p99 = {8: 20.0, 16: 30.0, 32: 120.0}  # the 32-connection points miss the SLO

    class Meter:
        def start(self) -> None: ...

        def stop(self) -> dict:
            return {"our_cpu_cores": 1.8, "other_cpu_cores": 0.1}

    class FakeBench:
        url, meter, variant = "http://127.0.0.1:1", Meter(), None

        def use(self, v: str, model: str) -> None:
            self.variant = v

    bench = FakeBench()
    monkeypatch.setattr(serving, "wrk", lambda url, s, c, body: {"rps": rps[(bench.variant, c)], "p99_ms": p99[c],
                                                                 "non2xx": 0, "connections": c})  # fmt: skip
    caps = {"static_default": 10, "adaptive": 64}
    monkeypatch.setattr(
        serving, "replica_batch_stats", lambda url: {"batches": {}, "max_batch_size": caps[bench.variant]}
    )
    sat = serving.saturated(bench, ["static_default", "adaptive"], 1.0, 2)
    assert sat["static_default"]["peak_rps"] == 1010.0 and sat["static_default"]["peak_connections"] == 16
    assert sat["adaptive"]["peak_rps"] == 1150.0 and sat["adaptive"]["batch_cap"] == 32  # 64 capped at 32
    assert sat["adaptive"]["rps_within_slo"] == 1020.0  # the SLO key still skips the 32-connection point
    assert sat["adaptive"]["mean_batch"] is None and sat["adaptive"]["peak_cpu_cores"] == 1.8


def test_an_http_run_whose_generator_lagged_is_measured_again_and_kept_aside(monkeypatch):
    """Bench.http on a fake generator: a run sent later than the bound (p99) is not a measurement of the server
    (its stall came back as a burst): it goes to `lagged` and is run again; after GENERATOR_RERUNS re-runs the
    last one counts whatever its lag, marked as not sustained."""
    import concurrent.futures
    from types import SimpleNamespace

    import bench.serving as S
    from serve_app.simulator import Constant

    lags = iter([50.0, 3.0, 40.0, 40.0, 40.0])

    class Pool:
        def submit(self, *args):
            f = concurrent.futures.Future()
            f.set_result(SimpleNamespace(send_lag_p99_ms=next(lags), slo_attainment=0.5))
            return f

    b = object.__new__(S.Bench)
    b.runs, b.lagged, b.meter = [], [], SimpleNamespace(start=lambda: None)
    b.url = "http://127.0.0.1:1"
    monkeypatch.setattr(b, "use", lambda *a: None, raising=False)
    monkeypatch.setattr(b, "generator", lambda: Pool(), raising=False)
    monkeypatch.setattr(b, "_record", lambda v, p, t, pat, r: b.runs.append({"lag": r.send_lag_p99_ms}) or b.runs[-1],
                        raising=False)  # fmt: skip
    first = b.http("adaptive", Constant(10.0), 1.0)
    assert first == {"lag": 3.0, "generator_sustained": True}
    assert b.runs == [first] and b.lagged == [{"lag": 50.0, "generator_sustained": False}]
    second = b.http("adaptive", Constant(10.0), 1.0)
    assert S.GENERATOR_RERUNS == 2 and second == {"lag": 40.0, "generator_sustained": False}
    assert len(b.runs) == 2 and len(b.lagged) == 3


def test_a_ratio_of_grid_multiples_is_the_multiples_ratio():
    c = 178.05 / 0.75  # the handle path's unbatched capacity of one run; static held 0.75x, adaptive 1.125x
    assert 1.125 * c / (0.75 * c) < 1.5  # what floating point gives
    assert ratio(1.125 * c, 0.75 * c) == 1.5 and ratio(1.0, 3.0) == pytest.approx(1 / 3) and ratio(1.0, 0.0) is None


def test_ab_summary_takes_medians_per_setting_and_the_p99_at_32_connections():
    from bench.serve_user_thread import summarize, table_rows

    def point(within: float, p99_at: dict[int, float]) -> dict:
        pts = [{"connections": c, "p99_ms": p} for c, p in p99_at.items()]
        return {"rps_within_slo": within, "peak_rps": within + 10, "peak_cpu_cores": 1.5, "points": pts}

    sat = {
        "a": {"nobatch": [point(100, {8: 1, 32: 50}), point(300, {8: 2, 32: 70}), point(200, {8: 3, 32: 60})]},
        "b": {"nobatch": [point(10, {32: 5}), point(30, {32: 7})]},
    }
    within, peak, cores, p99 = summarize(sat)
    assert within == {"a": {"nobatch": 200}, "b": {"nobatch": 20}}
    assert peak["a"]["nobatch"] == 210 and cores["b"]["nobatch"] == 1.5
    assert p99 == {"a": {"nobatch": 60}, "b": {"nobatch": 6}}  # the 8-connection points left out
    rows = table_rows(sat, "setting")
    assert [(r["setting"], r["rps within SLO"]) for r in rows] == [("a", 200), ("b", 20)]
