"""bench/serving.py's analysis on fakes (no Ray, no HTTP): the held-rate search and the saturated cost model."""

from __future__ import annotations

import pytest

from bench.serving import search_held


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


def test_nothing_held_down_to_the_floor_is_zero_and_bad_arguments_are_refused():
    held, _ = search_held(["a"], [1.0], fake_measure({"a": 0.01}, []), 1, descend=2, refine=2)
    assert held == {"a": 0.0}
    with pytest.raises(ValueError, match="repeats must be"):
        search_held(["a"], [1.0], fake_measure({"a": 1.0}, []), 0)
    with pytest.raises(ValueError, match="mults must be"):
        search_held(["a"], [2.0, 1.0], fake_measure({"a": 1.0}, []), 1)
