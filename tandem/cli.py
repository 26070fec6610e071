"""`tandem` command line: a thin shim that turns flags into configs and calls the job's main(cfg).

tandem run       the whole pipeline on an embedded local Ray (or --address)
tandem train     data + distributed training only
tandem tune      the compression sweep alone
tandem bench     one of the benchmarks under bench/

Every run is named (--name, default a UTC timestamp) and keeps everything under --storage/<name> (a directory,
file://, s3://bucket/prefix with the endpoint from AWS_ENDPOINT_URL, or gs://); --resume NAME continues one.
On a cluster: ray job submit --working-dir . -- tandem run --address auto --storage s3://bucket/runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from actors.comm import CommConfig
from actors.dataset import DataConfig
from actors.infobatch import InfoBatchConfig
from actors.train_local import TrainConfig
from actors.trainer import DistConfig
from actors.weight_store import WeightRule
from actors.weighted_stream import StreamConfig
from kernels.precision import PrecisionConfig


def _shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be C,H,W (three ints), got {text!r}") from None
    return c, h, w


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {type(value).__name__}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--preset", default="small", help="built-in model: tiny, small, resnet18 (default small)")
    g.add_argument("--model", help="user model as package.module:function returning an nn.Module")
    g.add_argument("--model-args", type=_json_object, default={},
                   help='keyword arguments of --model as a JSON object, e.g. \'{"width": 16}\'')  # fmt: skip
    g.add_argument("--save", default="lean", choices=["lean", "fast"], help="memory mode of the fused op")
    g.add_argument("--data", help="training parquet (file or directory); default: bundled digits")
    g.add_argument("--test-data", help="held-out parquet; default: a split of --data")
    g.add_argument("--image-shape", type=_shape, help="C,H,W when the parquet metadata does not say")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; 4 with --smoke)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="samples per optimizer step, split over the workers (64; 32 with --smoke)")  # fmt: skip
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="training dtype (default: from hardware)")
    g.add_argument("--local", action="store_true", help="train in this process, without Ray")
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS"),
        help="Ray cluster address, e.g. auto (default: $RAY_ADDRESS, which `ray job submit` sets, else an "
        "embedded local Ray)",
    )
    g.add_argument("--nodes", type=int, default=2, help="simulated nodes of the embedded Ray (default 2)")
    g.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 4; 2 with --smoke)")
    g.add_argument(
        "--workers-per-node",
        type=int,
        default=None,
        help="the same number of workers on each node used (checked before training; default: as placed)",
    )
    g.add_argument("--cpus-per-worker", type=float, default=1.0)
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="GPUs per Train worker and Tune trial (default: 1 if the cluster has GPUs); a Serve replica asks for "
        "one only where its served form runs on a GPU (FP8)",
    )
    g.add_argument("--placement", default="SPREAD", help="placement strategy of the workers (default SPREAD)")
    g.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from checkpoint")
    g.add_argument("--checkpointing", default="none", help="activation checkpointing: none, all, or k")
    g = p.add_argument_group("gradient communication (hierarchical: exact inside a node, compressed between nodes)")
    g.add_argument(
        "--comm",
        choices=["hierarchical", "allreduce"],
        default="hierarchical",
        help="hierarchical (default: the hook below) or allreduce (DDP's own flat allreduce, no hook)",
    )
    g.add_argument("--codec", choices=["2bit", "lowrank", "none"], default="2bit", help="inter-node codec")
    g.add_argument(
        "--comm-mode",
        choices=["always", "auto", "never"],
        default="auto",
        help="compress only when the probed inter-node link is slow (auto, default), always, or never",
    )
    g.add_argument("--warmup-steps", type=int, default=0, help="exact allreduce steps before compressing")
    g.add_argument(
        "--inter-transport",
        choices=["torch", "ray"],
        default="torch",
        help="inter-node exchange: torch.distributed, or CuPy/NCCL via ray.util.collective (GPUs)",
    )
    g = p.add_argument_group("sample weighting")
    g.add_argument(
        "--weighted",
        action="store_true",
        help="draw rows by per-sample difficulty weights (off by default: it needed 1.064x the samples of "
        "uniform sampling to reach the target on MNIST-1D)",
    )
    g.add_argument("--uniform", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    g.add_argument("--unbiased", action="store_true", help="scale losses by 1/(N p) under weighted sampling")
    g.add_argument("--epoch-size", type=int, help="rows drawn per epoch (default: dataset size)")
    g.add_argument("--weight-every-steps", type=int, default=0, help="apply the weight rule every k steps too")
    g.add_argument(
        "--infobatch",
        action="store_true",
        help="InfoBatch-style pruning: each epoch skip half of the below-mean-loss samples, rescale the kept ones; "
        "full data in the last 12.5%% of epochs; an epoch is its kept rows only (fewer steps, the LR paced by epoch "
        "progress; not with --weighted)",
    )
    g = p.add_argument_group("runs and storage")
    g.add_argument(
        "--storage",
        default=None,
        help="where runs live: directory, file://, s3://bucket/prefix, gs:// (default ~/tandem-runs)",
    )
    g.add_argument("--name", default="", help="this run's name under --storage (default: a UTC timestamp)")
    g.add_argument("--resume", metavar="NAME", help="continue the run NAME from its latest checkpoint")
    g.add_argument("--workdir", default=None, help="a local directory that also receives the report and plots")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (fits a 4-CPU cluster): minutes on 2 cores")


def _add_pipeline(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression sweep, serving, load test")
    g.add_argument("--skip", action="append", default=[], choices=["tune", "serve", "loadtest"],
                   help="leave a pipeline step out (repeatable)")  # fmt: skip
    g.add_argument("--trials", type=int, default=None, help="sweep trials (default 8; 4 with --smoke)")
    g.add_argument("--max-acc-drop", type=float, default=1.0, help="accuracy points the chosen model may lose")
    g.add_argument("--serve-port", type=int, default=8000, help="HTTP port on 127.0.0.1 (default 8000)")
    g.add_argument("--load-rate", type=float, default=100.0, help="mean load-test rate, req/s (sine +-50%%)")
    g.add_argument("--load-seconds", type=float, default=None, help="load-test duration (default 10; 5 smoke)")
    g.add_argument(
        "--keep-serving",
        action="store_true",
        help="leave the app running after the report (by default it is deleted when the job ends)",
    )


def run_config(args: argparse.Namespace):
    from tandem.job import DEFAULT_STORAGE, STEPS, RunConfig

    pipeline = {}
    if args.command == "run":
        skip = set(args.skip) | ({"loadtest"} if "serve" in args.skip else set())
        pipeline = dict(
            steps=tuple(s for s in STEPS if s not in skip),
            trials=args.trials if args.trials is not None else (4 if args.smoke else 8),
            max_acc_drop=args.max_acc_drop,
            serve_port=args.serve_port,
            load_rate=args.load_rate,
            load_seconds=args.load_seconds if args.load_seconds is not None else (5.0 if args.smoke else 10.0),
            keep_serving=args.keep_serving,
        )
    epochs = args.epochs if args.epochs is not None else (4 if args.smoke else 8)
    batch_size = args.batch_size if args.batch_size is not None else (32 if args.smoke else 64)
    # smoke: 2 workers + 1 CPU for data fit a 4-CPU cluster (Tune trials and the Serve replica come after training)
    workers = args.workers if args.workers is not None else (2 if args.smoke else 4)
    if args.resume and args.name and args.name != args.resume:
        raise ValueError(f"--name and --resume must name the same run, got {args.name!r} and {args.resume!r}")
    return RunConfig(
        preset="tiny" if args.smoke and args.model is None and args.preset == "small" else args.preset,
        model=args.model,
        model_args=args.model_args,
        save=args.save,
        data=DataConfig(train_path=args.data, test_path=args.test_data, image_shape=args.image_shape),
        train=TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=args.lr,
            seed=args.seed,
            precision=PrecisionConfig(train_dtype=args.precision),
            infobatch=InfoBatchConfig() if args.infobatch else None,
        ),
        dist=DistConfig(
            num_workers=workers,
            workers_per_node=args.workers_per_node,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker or 0.0,
            placement=args.placement,
            max_failures=args.max_failures,
            checkpointing=args.checkpointing,
            comm=CommConfig(
                kind=args.comm,
                codec=args.codec,
                mode=args.comm_mode,
                warmup_steps=args.warmup_steps,
                transport=args.inter_transport,
                # the compiled CPU codec pays a 20-60 s compile per worker on first use: not worth it for smoke
                compiled_codec=not args.smoke,
            ),
        ),
        stream=StreamConfig(weighted=args.weighted, unbiased=args.unbiased, epoch_size=args.epoch_size),
        rule=WeightRule(every_steps=args.weight_every_steps),
        address=args.address,
        nodes=args.nodes,
        local=args.local,
        name=args.resume or args.name,
        resume=args.resume is not None,
        storage=args.storage or DEFAULT_STORAGE,
        workdir=args.workdir,
        gpus_per_worker=args.gpus_per_worker,
        smoke=args.smoke,
        **pipeline,
    )


BENCHMARKS = ("conv_bn", "codec", "checkpointing", "train_throughput", "weighting", "compress", "serving",
              "serve_replicas", "slow_link", "compression_accuracy", "scaling_model", "dist_accuracy",
              "cluster_link")  # fmt: skip


def run_benchmarks(name: str, quick: bool) -> int:
    """Runs benchmarks as `python -m bench.<name>` (one process each, so one failing does not stop the rest);
    'all' then rewrites BENCHMARKS.md from bench/results/."""
    import importlib.util
    import subprocess

    if name in ("claims", "regression"):
        import importlib

        return importlib.import_module(f"bench.{name}").main([])
    names = BENCHMARKS if name == "all" else (name,)
    failed = []
    for n in names:
        if importlib.util.find_spec(f"bench.{n}") is None:
            print(f"tandem bench: bench/{n}.py is not there; skipped")
            continue
        print(f"== bench {n}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{n}", *(["--quick"] if quick else [])]).returncode != 0:
            failed.append(n)
    if name == "all":
        from bench.claims import write

        print(f"wrote {write()}")
    if failed:
        print(f"tandem bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def write_dashboard(path: str) -> str:
    """One Grafana dashboard: Serve's panels (serve_app/metrics.py) followed by training's (actors/train_metrics.py)."""
    import json
    from pathlib import Path

    from actors.train_metrics import grafana_panels
    from serve_app.metrics import grafana_dashboard

    dash = grafana_dashboard(title="tandem: training and serving")
    dash["uid"] = "tandem"
    rows = max((p["gridPos"]["y"] + p["gridPos"]["h"]) // 8 for p in dash["panels"])
    dash["panels"] += grafana_panels(first_id=len(dash["panels"]) + 1, first_row=rows)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dash, indent=2) + "\n")
    return str(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the whole pipeline on an embedded local Ray (default data: digits)")
    _add_common(run)
    _add_pipeline(run)
    _add_common(sub.add_parser("train", help="prepare data and train on Ray Train"))
    tune = sub.add_parser("tune", help="compression sweep with Ray Tune (see `tandem tune --help`)", add_help=False)
    tune.add_argument("args", nargs=argparse.REMAINDER)
    from tandem.cli_serve import add_parsers

    add_parsers(sub)
    dash = sub.add_parser("dashboard", help="write the Grafana dashboard JSON (training + serving panels)")
    dash.add_argument("--out", default="grafana/tandem.json", help="output path (default grafana/tandem.json)")
    bench = sub.add_parser("bench", help="run benchmarks under bench/ and write BENCHMARKS.md")
    bench.add_argument(
        "name",
        choices=["all", *BENCHMARKS, "regression", "claims"],
        help="a benchmark; 'all' (each in turn, then BENCHMARKS.md); the regression gate; or claims",
    )
    bench.add_argument("--quick", action="store_true", help="the short version of each benchmark")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tune"]:  # the sweep owns its flags (tune/sweep.py)
        from tune.sweep import main as tune_main

        try:
            tune_main(argv[1:])
        except (ValueError, TypeError) as e:
            print(f"tandem: error: {e}", file=sys.stderr)
            return 2
        return 0
    args = build_parser().parse_args(argv)
    if args.command in ("serve", "pretrain-bandit", "loadtest"):
        from tandem.cli_serve import dispatch

        return dispatch(args)
    try:
        if args.command in ("run", "train"):
            from tandem.job import main as job_main
            from tandem.local_ray import interrupt_on_sigterm

            interrupt_on_sigterm()  # `ray job stop` deletes the run's Serve app as Ctrl-C does
            job_main(run_config(args))
        elif args.command == "bench":
            return run_benchmarks(args.name, args.quick)
        elif args.command == "dashboard":
            print(f"wrote {write_dashboard(args.out)}")
    except (ValueError, TypeError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: what the command started is stopped by its finally blocks
        print("tandem: stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
