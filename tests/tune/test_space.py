import pytest

from models.quantize import FP8, Int8PTQ, Int8QAT
from tune.measure import MeasureConfig
from tune.pareto import choose, dominates, pareto_front
from tune.space import SearchSpace, TrialSettings
from tune.sweep import SweepConfig


def _settings(**kw):
    d = dict(prune_ratio=0.2, quant="int8_ptq", finetune_epochs=2, calib_size=64, per_channel=True)
    return TrialSettings.from_dict({**d, **kw})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prune_ratio=(0.0, 0.95)), "prune_ratio must be"),
        (dict(prune_ratio=(0.4, 0.1)), "prune_ratio must be"),
        (dict(prune_ratio=0.3), "must be a \\(lo, hi\\) pair"),
        (dict(quant=("int8_ptq", "int4")), "quant must be a non-empty subset"),
        (dict(quant=()), "quant must be a non-empty subset"),
        (dict(finetune_epochs=(2, 1)), "finetune_epochs must be"),
        (dict(calib_size=(0,)), "calib_size must be"),
        (dict(per_channel=("yes",)), "per_channel must be"),
    ],
)
def test_invalid_search_space_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchSpace(**kwargs)


def test_invalid_sweep_and_trial_settings_raise():
    with pytest.raises(TypeError, match="unexpected keyword"):
        SearchSpace(prune_ration=(0, 0.5))
    with pytest.raises(ValueError, match="trials must be"):
        SweepConfig(trials=0)
    with pytest.raises(ValueError, match="max_acc_drop_pts must be"):
        SweepConfig(max_acc_drop_pts=-1)
    with pytest.raises(TypeError, match="searcher must be"):
        SweepConfig(searcher="optuna")
    with pytest.raises(ValueError, match="batch_sizes must be"):
        MeasureConfig(batch_sizes=(0,))
    with pytest.raises(ValueError, match="exactly the keys"):
        TrialSettings.from_dict({"prune_ratio": 0.1})
    with pytest.raises(ValueError, match="quant must be one of"):
        _settings(quant="int4")
    with pytest.raises(ValueError, match="ratio must be"):
        _settings(prune_ratio=0.99)


def test_trial_dict_becomes_configs_once():
    assert _settings().quant_config() == Int8PTQ(per_channel=True, calib_samples=64)
    qat = _settings(quant="int8_qat", finetune_epochs=3, per_channel=False)
    assert qat.quant_config() == Int8QAT(per_channel=False, calib_samples=64, epochs=3)
    assert qat.plain_finetune_epochs() == 0  # QAT takes the fine-tune epochs itself
    assert _settings(quant="fp8").quant_config() == FP8(per_channel=True, calib_samples=64)
    assert _settings(quant="none").quant_config() is None
    assert _settings(prune_ratio=0.0).prune_config() is None
    space = SearchSpace().to_tune()
    assert set(space) == {"prune_ratio", "quant", "finetune_epochs", "calib_size", "per_channel"}


def _row(name, acc, lat, size):
    return {"trial": name, "accuracy": acc, "latency_ms": lat, "size_bytes": size}


def test_pareto_front_and_choice():
    rows = [
        _row("fp32", 0.98, 10.0, 400),
        _row("int8", 0.975, 4.0, 100),
        _row("int8-pruned", 0.96, 3.0, 70),
        _row("dominated", 0.95, 5.0, 120),  # worse than int8 in everything
        _row("fat-but-best", 0.985, 12.0, 800),
    ]
    assert dominates(rows[1], rows[3]) and not dominates(rows[1], rows[2])
    assert [r["trial"] for r in pareto_front(rows)] == ["int8-pruned", "int8", "fp32", "fat-but-best"]
    assert choose(rows, baseline_accuracy=0.98, max_acc_drop_pts=1.0)["trial"] == "int8"
    assert choose(rows, baseline_accuracy=0.98, max_acc_drop_pts=2.0)["trial"] == "int8-pruned"
    assert choose(rows, baseline_accuracy=0.999, max_acc_drop_pts=0.1) is None
