"""bench/slow_link.py's bookkeeping (the measurement itself needs root and namespaces): an `auto` column is kept
only under the auto rule it was measured with, and it carries that rule's decision."""

from __future__ import annotations

from bench import slow_link


def _runs(auto: dict) -> dict:
    per_m = {
        "flat": {"step_s": 2.0, "link_bytes_per_step": 1.0},
        "hier_2bit": {"step_s": 1.0, "link_bytes_per_step": 0.1},
    }
    return {"unshaped": {"grad11m": {**per_m, "auto": {"step_s": 1.9, "link_bytes_per_step": 1.0, **auto}}}}


def test_auto_columns_of_an_earlier_rule_are_dropped():
    rule = slow_link.auto_rule()
    assert rule["auto_codec_s_per_elem"] > 0  # the constants collectives/hook.py decides with
    current = _runs({"compressed": False, "probed_gbit": 20.0})
    assert slow_link.drop_stale_auto(current, {"unshaped": dict(rule)}, rule) == []
    summary = slow_link.summarize(current)
    assert summary["auto_mode_fast_link_ratio"] == 1.9 / 2.0
    assert summary["auto_decisions"] == {"unshaped": {"grad11m": {"compressed": False, "probed_gbit": 20.0}}}
    for rules in ({}, {"unshaped": {**rule, "auto_codec_fixed_s": 1.0}}):  # no record, or another rule
        old = _runs({})
        assert slow_link.drop_stale_auto(old, rules, rule) == ["unshaped"]
        assert "auto" not in old["unshaped"]["grad11m"] and "flat" in old["unshaped"]["grad11m"]
        assert slow_link.summarize(old)["auto_mode_fast_link_ratio"] is None
