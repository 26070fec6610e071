"""The compression sweep: Ray Tune searches pruning and quantization settings (tune/space.py), each trial
prunes, fine-tunes, quantizes and measures (tune/trial.py), and the result is the Pareto front over
accuracy, latency and size with the chosen model exported as an artifact (tune/pareto.py).

Search: Optuna's multi-objective TPE sampler through Tune's `OptunaSearch` (`OptunaMO`, the default), or
Tune's random `BasicVariantGenerator` (`RandomSearch`). Early stopping: ASHA on the fine-tune accuracy that
trials report each epoch. Outputs under `out_dir`: pareto.md, trials.json, pareto.png, artifact/ (the chosen
model), ray/ (Tune's own run directory, trial checkpoints = trial artifacts). With `storage` (a models/storage.py
URI), Tune's experiment and the trial artifacts live there instead, and the report and the chosen artifact are
copied there too, so trials on any node and any later step read them without a shared disk.

Entry point: `main(argv)` (`tandem tune`): --trials, --max-acc-drop, --smoke, --address, --storage, --name, ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kernels.precision import DeviceCaps
from models import storage as store
from tune.baseline import BaselineConfig, load_baseline
from tune.measure import MeasureConfig
from tune.pareto import OBJECTIVES, write_report
from tune.space import SearchSpace
from tune.trial import TrialContext, tune_trainable


@dataclass(kw_only=True, slots=True)
class OptunaMO:
    """Multi-objective Optuna (TPE) through ray.tune.search.optuna.OptunaSearch (needs the optuna package)."""

    seed: int = 0
    """Sampler seed."""

    def build(self):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=self.seed)
        return OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), sampler=sampler)


@dataclass(kw_only=True, slots=True)
class RandomSearch:
    """Tune's built-in random search (no extra dependency)."""

    seed: int = 0
    """Random state of the variant generator."""

    def build(self):
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=self.seed)


@dataclass(kw_only=True, slots=True)
class SweepConfig:
    """A whole sweep."""

    trials: int = 16
    """Number of trials (Tune samples)."""
    max_acc_drop_pts: float = 1.0
    """The chosen model is the fastest whose accuracy is within this many points of the baseline."""
    space: SearchSpace = field(default_factory=SearchSpace)
    """What is searched."""
    searcher: OptunaMO | RandomSearch = field(default_factory=OptunaMO)
    """How the space is searched."""
    asha: bool = True
    """Stop unpromising fine-tunes early with ASHA (on per-epoch accuracy)."""
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    """The trained model and data the trials start from."""
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    """Latency measurement of each trial."""
    out_dir: str = "tune_results"
    """Where the report, the chosen artifact and Tune's run directory go."""
    concurrency: int = 1
    """Trials run at once (1 keeps latency measurements undisturbed on a small machine)."""
    verbose: int = 1
    """Tune's progress output level (0 silent, 1 status table, 2 + trial results)."""
    storage: str | None = None
    """Storage URI of the sweep (Tune experiment, trial artifacts, chosen artifact, report); None: out_dir/ray."""
    gpus_per_trial: float = 0.0
    """GPUs each trial asks for (tune.with_resources); its latency is then measured on that GPU."""
    trial_hardware: DeviceCaps | None = None
    """The hardware the trials land on, which decides whether FP8 stays in the space (`sweep_space`); None:
    probed when the sweep starts (`trial_caps`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"trials must be a positive int, got {self.trials!r}")
        if not isinstance(self.max_acc_drop_pts, int | float) or not 0 <= self.max_acc_drop_pts <= 100:
            raise ValueError(f"max_acc_drop_pts must be a number in [0, 100], got {self.max_acc_drop_pts!r}")
        if not isinstance(self.concurrency, int) or self.concurrency < 1:
            raise ValueError(f"concurrency must be a positive int, got {self.concurrency!r}")
        if not isinstance(self.searcher, OptunaMO | RandomSearch):
            raise TypeError(f"searcher must be OptunaMO or RandomSearch, got {type(self.searcher).__name__}")
        if not isinstance(self.gpus_per_trial, int | float) or self.gpus_per_trial < 0:
            raise ValueError(f"gpus_per_trial must be a number >= 0, got {self.gpus_per_trial!r}")
        if self.trial_hardware is not None and not isinstance(self.trial_hardware, DeviceCaps):
            raise TypeError(f"trial_hardware must be a kernels.precision.DeviceCaps or None, got "
                            f"{type(self.trial_hardware).__name__}")  # fmt: skip
        if self.storage is not None:
            store.check(self.storage)

    def trial_resources(self) -> dict[str, float]:
        """What each trial asks Ray for."""
        return {"cpu": 1, **({"gpu": self.gpus_per_trial} if self.gpus_per_trial else {})}

    @classmethod
    def smoke(cls, out_dir: str | None = None, **overrides) -> SweepConfig:
        """Seconds-sized: tiny preset, short fine-tunes, eager latency."""
        defaults = dict(
            trials=4,
            space=SearchSpace(finetune_epochs=(0, 1), calib_size=(64,)),
            baseline=BaselineConfig(preset="tiny", epochs=5),
            measure=MeasureConfig(compile=False, warmup=1, iters=5),
            verbose=0,
        )
        if out_dir is not None:
            defaults["out_dir"] = out_dir
        return cls(**{**defaults, **overrides})


@dataclass(slots=True)
class SweepResult:
    rows: list[dict]
    """Finished trials (config + metrics + artifact path)."""
    front: list[dict]
    chosen: dict | None
    baseline_accuracy: float
    artifact: str | None
    """The chosen model's artifact (a copy under `storage`, else out_dir), None if no trial was within the
    accuracy drop."""
    paths: dict[str, Path]
    stopped_early: int = 0
    """Trials the ASHA scheduler stopped before their last fine-tuning epoch (not in `rows`)."""
    failed: int = 0
    """Trials that raised (not in `rows`; Tune's logs under out_dir/ray say why)."""
    serving: str | None = None
    """The serving set (models.artifact.write_serving_set) of the measured forms a replica picks from by its
    hardware (tune.pareto.serving_forms), under `storage` (else out_dir); None when no trial was within the
    accuracy drop."""


def trial_caps(gpus_per_trial: float) -> DeviceCaps:
    """The hardware a sweep's trials get: when they ask for GPUs, the capabilities of one, probed by a task that
    asks for one as a trial does (on a cluster whose GPUs are all of one kind, as cluster.yaml's); else CPU."""
    if not gpus_per_trial:
        return DeviceCaps("cpu")
    import ray

    def probe() -> DeviceCaps:  # a function, as ray.remote needs (a bound classmethod is refused)
        return DeviceCaps.probe()

    return ray.get(ray.remote(num_gpus=min(1.0, gpus_per_trial), num_cpus=0)(probe).remote())


def trial_gpus(requested: float | None) -> float:
    """GPUs per trial: `requested` (--gpus-per-trial) as given, else 1 where the connected cluster has GPUs and 0
    where it has none (issue 14: the trials, like Train workers and Serve replicas, use a cluster's GPUs)."""
    if requested is not None:
        return float(requested)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def sweep_space(cfg: SweepConfig) -> SearchSpace:
    """The space the sweep searches: `cfg.space` for the trials' hardware (SearchSpace.for_hardware: FP8 only
    where the trials run it, CUDA sm_89+, as Serve's replicas pick it), printed when FP8 was left out."""
    caps = cfg.trial_hardware if cfg.trial_hardware is not None else trial_caps(cfg.gpus_per_trial)
    space = cfg.space.for_hardware(caps)
    if space.quant != cfg.space.quant:
        where = "CPU" if caps.cuda_capability is None else f"CUDA sm_{''.join(map(str, caps.cuda_capability))}"
        print(f"tandem: fp8 left out of the sweep: its trials run on {where} (FP8 needs CUDA sm_89+); "
              f"searching {', '.join(space.quant)}", flush=True)  # fmt: skip
    return space


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Runs the sweep on the current Ray cluster (ray.init() first) and writes its report."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = sweep_space(cfg)
    out = Path(cfg.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sweep_uri = cfg.storage or str(out)
    baseline = cfg.baseline
    if baseline.cache_dir is None and cfg.storage is None:  # trials in other processes find the driver's cache
        baseline = dataclasses.replace(baseline, cache_dir=str(baseline.cache_path().resolve()))
    model, data = load_baseline(baseline)  # trained once here, loaded by every trial
    base_acc = data.accuracy(model)
    if cfg.storage is not None and baseline.checkpoint is None:
        # a baseline trained here reaches trials on other nodes through the storage
        trained = baseline.cache_path() / baseline.cache_name()
        uri = store.upload_dir(trained, store.join(cfg.storage, "baseline"))
        baseline = dataclasses.replace(baseline, checkpoint=uri)
    fs, tune_path = store.resolve(store.join(sweep_uri, "ray"))
    ctx = TrialContext(baseline=baseline, measure=cfg.measure)
    scheduler = None
    if cfg.asha:
        scheduler = ASHAScheduler(
            metric="accuracy", mode="max", time_attr="training_iteration", grace_period=1, reduction_factor=2,
            max_t=space.finetune_epochs[1] + 1,
        )  # fmt: skip
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trainable, ctx=ctx), cfg.trial_resources()),
        param_space=space.to_tune(),
        tune_config=tune.TuneConfig(
            search_alg=cfg.searcher.build(),
            scheduler=scheduler,
            num_samples=cfg.trials,
            max_concurrent_trials=cfg.concurrency,
        ),
        run_config=tune.RunConfig(name="compress", storage_path=tune_path, storage_filesystem=fs, verbose=cfg.verbose),
    )
    grid = tuner.fit()
    rows = []
    stopped = failed = 0
    for result in grid:
        m = result.metrics or {}
        if result.error is not None:
            failed += 1
            continue
        if not m.get("final") or result.checkpoint is None:
            stopped += 1  # stopped early by ASHA
            continue
        ckpt = result.checkpoint
        rows.append({"trial": m["trial_id"], **result.config, **{k: m[k] for k in _METRICS if k in m},
                     "artifact": store.fs_uri(ckpt.filesystem, ckpt.path)})  # fmt: skip
    if not rows:
        raise RuntimeError(f"no trial finished; see Tune's logs under {store.join(sweep_uri, 'ray')}")
    title = f"compression sweep ({baseline.name})"
    report = write_report(rows, base_acc, cfg.max_acc_drop_pts, out, title=title)
    artifact = None
    if report["chosen"] is not None:
        artifact = store.join(sweep_uri, "artifact")
        if cfg.storage is None:
            store.download_dir(report["chosen"]["artifact"], out / "artifact")
        else:
            with tempfile.TemporaryDirectory(prefix="tandem-chosen-") as tmp:
                store.upload_dir(store.download_dir(report["chosen"]["artifact"], tmp), artifact)
    serving = write_forms(rows, report["chosen"], base_acc, cfg.max_acc_drop_pts, store.join(sweep_uri, "serving"))
    if cfg.storage is not None:
        for path in report["paths"].values():
            store.upload_file(path, store.join(cfg.storage, Path(path).name))
    return SweepResult(rows, report["front"], report["chosen"], base_acc, artifact, report["paths"], stopped, failed,
                       serving)  # fmt: skip


_FORM_KEYS = ("latency_ms", "latency_batch_1_ms", "accuracy", "acc_drop_pts", "trial", "measured_on", "prune_ratio",
              "size_bytes")  # fmt: skip


def write_forms(rows: list[dict], chosen: dict | None, base_acc: float, max_acc_drop_pts: float,
                uri: str) -> str | None:  # fmt: skip
    """Writes the serving set of the measured forms at `uri` (each form's artifact is its trial's, as measured),
    the chosen row's scheme the default where it is among them; returns `uri`, None when no row qualifies."""
    from models.artifact import write_serving_set
    from tune.pareto import serving_forms

    forms = serving_forms(rows, base_acc, max_acc_drop_pts)
    if not forms:
        return None
    entries = {q: {"artifact": r["artifact"], **{k: r[k] for k in _FORM_KEYS if k in r}} for q, r in forms.items()}
    default = chosen["quant"] if chosen is not None and chosen.get("quant") in forms else next(iter(forms))
    return write_serving_set(uri, entries, default)


_METRICS = ("accuracy", "acc_drop_pts", "baseline_accuracy", "latency_ms", "latency_batch_1_ms",
            "latency_batch_32_ms", "size_bytes", "params", "macs", "measured_on")  # fmt: skip


def main(argv: list[str] | None = None) -> SweepResult:
    """`tandem tune`: runs the sweep on an embedded local Ray (or the cluster at --address) and prints where
    things are. The sweep is a named run under --storage, like `tandem run`."""
    from models.data import DataConfig
    from tandem.job import DEFAULT_STORAGE, RunConfig, claim_run

    p = argparse.ArgumentParser(prog="tandem tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=None, help="number of trials (default 16; 4 with --smoke)")
    p.add_argument("--max-acc-drop", type=float, default=1.0, help="accuracy points the chosen model may lose")
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 trials, seconds per trial")
    p.add_argument("--preset", default="small", help="model preset trained when no --checkpoint is given")
    p.add_argument(
        "--model", help="user model as package.module:function (trained here unless --checkpoint holds one of it)"
    )
    p.add_argument("--model-args", type=json.loads, default={}, help="keyword arguments of --model as JSON")
    p.add_argument("--checkpoint", default=None, help="fp32 artifact directory or storage URI of the trained model")
    p.add_argument("--data", help="training parquet (file, directory or storage URI); default: bundled digits")
    p.add_argument("--test-data", help="held-out parquet; default: a split of --data")
    p.add_argument("--searcher", choices=("optuna", "random"), default="optuna")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address, e.g. auto (default: $RAY_ADDRESS, as `ray job submit` sets it, else an "
        "embedded local Ray)",
    )
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help=f"where runs live: directory, file://, s3://bucket/prefix, gs:// (default {DEFAULT_STORAGE})",
    )
    p.add_argument("--name", default="", help="the sweep's run name under --storage (default: a timestamp)")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="GPUs per trial (default: 1 where the cluster has GPUs, else 0)",
    )
    p.add_argument("--out", default=None, help="a local directory that also receives the report")
    args = p.parse_args(argv)
    run = claim_run(RunConfig(name=args.name, storage=args.storage))
    run_uri = run.run_uri()
    searcher = OptunaMO() if args.searcher == "optuna" else RandomSearch()
    data = DataConfig(train_path=args.data, test_path=args.test_data)
    local = store.local_path(run_uri)
    out_dir = local if local is not None else tempfile.mkdtemp(prefix=f"tandem-tune-{run.name}-")
    import ray

    # on an existing cluster Ray refuses num_cpus/num_gpus; only the embedded one over-declares CPUs
    if not ray.is_initialized():
        if args.address:
            from models.user_model import runtime_env_for

            env = runtime_env_for(args.model) if args.model else None
            ray.init(address=args.address, runtime_env=env)
        else:
            ray.init(num_cpus=max(4, args.concurrency))
    gpus = trial_gpus(args.gpus_per_trial)
    common = dict(searcher=searcher, storage=run_uri, gpus_per_trial=gpus, out_dir=out_dir)
    if args.smoke:
        base = BaselineConfig(
            preset="tiny", model=args.model, model_args=args.model_args, epochs=5, checkpoint=args.checkpoint, data=data
        )
        trials = {"trials": args.trials} if args.trials is not None else {}
        cfg = SweepConfig.smoke(max_acc_drop_pts=args.max_acc_drop, baseline=base, verbose=1, **trials, **common)
    else:
        cfg = SweepConfig(
            trials=args.trials if args.trials is not None else 16,
            max_acc_drop_pts=args.max_acc_drop,
            baseline=BaselineConfig(
                preset=args.preset, model=args.model, model_args=args.model_args, checkpoint=args.checkpoint, data=data
            ),
            concurrency=args.concurrency,
            **common,
        )
    print(f"tandem tune: run {run.name!r}, storage {run_uri}")
    result = run_sweep(cfg)
    print(result.paths["table"].read_text())
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for path in result.paths.values():
            Path(args.out, Path(path).name).write_bytes(Path(path).read_bytes())
    print(
        f"report: {store.join(run_uri, 'pareto.md')}\nchosen artifact: {result.artifact}\n"
        f"serving set (each replica loads the measured form for its hardware): {result.serving}"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
