"""One trial of the sweep: trained checkpoint -> prune -> fine-tune (or QAT) -> quantize -> measure.

Run by Ray Tune as a function trainable. Each fine-tune epoch is reported (accuracy so far), so ASHA can stop
a hopeless trial early; the last report carries every objective and the trial's artifact as a Tune
Checkpoint (Tune copies it to the run's storage, so it survives the worker). Reports before the last have
`final=False` and huge latency/size, so an early-stopped trial never looks better than a finished one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
import torch.nn as nn

from models.artifact import save_artifact
from models.macs import count_macs, count_params
from models.prune import prune_
from models.quantize import quantize_
from models.training import TrainConfig, fit_epochs
from tune.baseline import BaselineConfig, EvalData, load_baseline
from tune.measure import MeasureConfig, device_label, measured_form
from tune.pareto import GPU_FORMS
from tune.space import TrialSettings

_NOT_YET = 1e12  # latency/size of a report before the last (finite: searchers may reject inf)


@dataclass(kw_only=True, slots=True)
class TrialContext:
    """What every trial shares (fixed for a sweep)."""

    baseline: BaselineConfig
    """The trained checkpoint and data."""
    measure: MeasureConfig
    """Latency measurement."""
    finetune_lr: float = 0.05
    """Peak learning rate of the post-pruning fine-tune (cosine over its epochs)."""
    threads: int = 1
    """torch threads per trial (trials may run side by side)."""


def finetune(model: nn.Module, data: EvalData, epochs: int, lr: float, on_epoch, seed: int = 0) -> None:
    """`epochs` of SGD on the train split (one cosine schedule over all of them, as after pruning; the one
    training loop of models/training.py; `seed` draws the batch order), calling `on_epoch(epoch, test_accuracy)`
    after each."""
    cfg = TrainConfig(epochs=epochs, lr=lr, seed=seed)
    fit_epochs(model, data.train, cfg, lambda epoch, stats: on_epoch(epoch + 1, data.accuracy(model)))


def run_trial(settings: TrialSettings, ctx: TrialContext, report, out_dir: str) -> dict:
    """Runs one trial; `report(metrics, artifact_dir | None)` is called per fine-tune epoch and at the end.
    Returns the final metrics (accuracy in [0, 1], acc_drop_pts, latency per batch size, size, MACs)."""
    model, data = load_baseline(ctx.baseline)
    base_acc = data.accuracy(model)
    pending = {"final": False, "latency_ms": _NOT_YET, "size_bytes": _NOT_YET}

    prune_info = None
    if (pcfg := settings.prune_config()) is not None:
        prune_info = {"ratio": pcfg.ratio, **prune_(model, pcfg, input_shape=data.input_shape).to_dict()}
    params, macs = count_params(model), count_macs(model, data.input_shape)

    def on_epoch(epoch: int, acc: float) -> None:
        report({**pending, "accuracy": acc, "acc_drop_pts": 100 * (base_acc - acc), "epoch": epoch}, None)

    if settings.plain_finetune_epochs():
        finetune(model, data, settings.plain_finetune_epochs(), ctx.finetune_lr, on_epoch)
    if (qcfg := settings.quant_config()) is not None:
        model = quantize_(model, qcfg, calib=data.train[0], train=data.train)
    acc = data.accuracy(model)
    # FP8 is timed where a replica serves it: on the trial's GPU when it has one (sm_89+ for real FP8); every
    # other scheme, and FP8 without a GPU (an emulation, never served as FP8), on CPU
    device = "cuda" if settings.quant in GPU_FORMS and torch.cuda.is_available() else "cpu"
    # an fp32 model's latency is of the form Serve would pick here; the manifest records which, so that a replica
    # on a matching machine runs exactly that form (serve_app.form_choice.from_manifest)
    lat, form = measured_form(model, data.input_shape, ctx.measure, device=device)
    manifest = save_artifact(
        model,
        out_dir,
        input_shape=data.input_shape,
        accuracy={"test_accuracy": acc, "baseline": base_acc},
        latency_ms=lat,
        pruning=prune_info,
        source_checkpoint=ctx.baseline.checkpoint or f"trained:{ctx.baseline.name}",
        probe=data.test[0][:32],
        class_names=data.class_names,
        extra={
            "trial": settings.to_dict(),
            "compiled_latency": ctx.measure.compile,
            "measured_on": device_label(device),
        },
        inference_form=form,
    )
    final = {
        "final": True,
        "accuracy": acc,
        "acc_drop_pts": 100 * (base_acc - acc),
        "baseline_accuracy": base_acc,
        "latency_ms": lat[f"batch_{ctx.measure.batch_sizes[-1]}"],
        **{f"latency_{k}_ms": v for k, v in lat.items()},
        "size_bytes": manifest["size_bytes"],
        "measured_on": device_label(device),
        "params": params,
        "macs": macs,
        "epoch": settings.plain_finetune_epochs() + 1,
    }
    report(final, out_dir)
    return final


def tune_trainable(config: dict, ctx: TrialContext) -> None:
    """The Ray Tune function trainable: converts the trial dict once, then reports through ray.tune."""
    from ray import tune

    torch.set_num_threads(ctx.threads)
    settings = TrialSettings.from_dict(config)

    def report(metrics: dict, artifact_dir: str | None) -> None:
        checkpoint = None if artifact_dir is None else tune.Checkpoint.from_directory(artifact_dir)
        tune.report(metrics, checkpoint=checkpoint)

    with tempfile.TemporaryDirectory(prefix="tandem-trial-") as tmp:
        run_trial(settings, ctx, report, tmp)
