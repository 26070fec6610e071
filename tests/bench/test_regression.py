"""The performance-regression gate: planted regressions fail it, changes within tolerance do not, and the
committed baselines hold on this machine."""

import pytest

from bench.regression import CHECKS, compare, gate, load_baselines


def test_planted_regression_fails_and_small_change_passes():
    base = load_baselines()
    assert set(base) == set(CHECKS)
    assert compare(dict(base), base) == []
    for name, check in CHECKS.items():
        sign = 1 if check.better == "lower" else -1
        if check.kind == "exact":
            worse, slightly = base[name] + sign * 3 * check.tolerance, base[name] + sign * 0.5 * check.tolerance
        else:
            worse = base[name] * (1 + sign * 2 * check.tolerance) if sign > 0 else base[name] * (1 - 0.9)
            slightly = base[name] * (1 + sign * 0.5 * check.tolerance)
        assert [f for f in compare({**base, name: worse}, base) if f.startswith(name)], name
        assert compare({**base, name: slightly}, base) == [], name
        # an improvement is never a failure
        better = base[name] * (0.5 if check.better == "lower" else 2.0)
        assert compare({**base, name: better}, base) == [], name


def test_missing_baseline_or_measurement_fails():
    base = load_baselines()
    name = next(iter(CHECKS))
    assert any("no baseline" in f for f in compare(base, {k: v for k, v in base.items() if k != name}))
    assert any("not measured" in f for f in compare({k: v for k, v in base.items() if k != name}, base))


@pytest.mark.timeout(600)
def test_gate_holds_against_committed_baselines():
    measured, failures = gate()
    assert failures == [], failures
    assert set(measured) >= set(CHECKS)
