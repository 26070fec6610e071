"""`tandem serve` and `tandem loadtest`: flags to configs, then serve_app.deploy (wired into tandem/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from serve_app.simulator import ArrivalPattern, Constant, Sine, Step


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `serve` and `loadtest` subcommands."""
    s = subparsers.add_parser("serve", help="serve a model artifact over HTTP (Ray Serve, adaptive batching)")
    s.add_argument(
        "artifact", nargs="?",
        help="artifact directory (models/artifact.py format) or its storage URI (s3://, gs://, file://): each"
        " replica fetches it onto its own node; omit it with --storage and --run",
    )  # fmt: skip
    s.add_argument("--storage", help="with --run: the runs' storage URI (as `tandem run --storage`)")
    s.add_argument(
        "--run", dest="run_name",
        help="serve run NAME in --storage: the sweep's serving set (each replica loads the measured form for its"
        " hardware), else its chosen model, else the trained one (--name is the model name in the routes)",
    )  # fmt: skip
    s.add_argument(
        "--host",
        help="HTTP host of the ingress and the replicas (default: 127.0.0.1 on the Ray this command starts, 0.0.0.0"
        " on a cluster given by --address, so the head's HAProxy reaches replicas on other nodes)",
    )  # fmt: skip
    s.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    s.add_argument("--name", default="tandem", help="model name in the /v2/models/{name} routes")
    s.add_argument("--version", help="version label (default: the weights' sha256 prefix)")
    s.add_argument(
        "--controller",
        default="slo_model",
        choices=["slo_model", "aimd", "bandit", "static", "unbatched"],
        help="batching controller (default slo_model)",
    )
    s.add_argument("--slo-ms", type=float, default=100.0, help="latency objective for p99 (default 100)")
    s.add_argument("--batching", type=json.loads, default={}, help="more BatchingConfig fields as JSON")
    s.add_argument(
        "--replicas", type=int, default=None,
        help="model replicas (default: one per core on the Ray this command starts, as its logical CPUs and memory"
        " allow, bench/results/serve_replicas.json; 1 on a cluster given by --address)",
    )  # fmt: skip
    s.add_argument("--canary", help="canary artifact directory: adds a router splitting traffic to it")
    s.add_argument("--canary-weight", type=float, default=0.1, help="canary traffic share (default 0.1)")
    s.add_argument("--canary-window-s", type=float, default=10.0, help="canary comparison window (default 10)")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray and block until Ctrl-C)")
    s.add_argument(
        "--gpus-per-replica", type=float, default=None,
        help="GPUs per model replica (default: 1 where the cluster has GPUs and the artifact runs on one, else 0)",
    )  # fmt: skip
    s.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of a local Ray (default 8)")
    s.add_argument(
        "--ingress", default="haproxy", choices=["haproxy", "proxy"],
        help="HTTP ingress of the local Ray: HAProxy straight to the replicas (default) or Serve's Python proxy",
    )  # fmt: skip
    s.add_argument("--access-log", action="store_true", help="Serve's per-request access log lines (default off)")
    s.add_argument(
        "--max-queued-requests", type=int, default=None,
        help="proxy-side bound (--ingress proxy only): beyond this many waiting for a replica the proxy answers 503"
        " itself (default none;"
        " 16 with --batching '{\"max_queue_len\": 16}' kept goodput under 1.5x overload on 2 cores)",
    )  # fmt: skip

    s.add_argument("--bandit-policy", help="with --controller bandit: a policy from `tandem pretrain-bandit`")

    pb = subparsers.add_parser(
        "pretrain-bandit", help="pre-train the bandit batching controller in the simulator for an artifact"
    )
    pb.add_argument("artifact", help="artifact directory: its forward pass is timed per batch size (1 thread)")
    pb.add_argument("--out", default="bandit_policy.json", help="policy JSON to write (default bandit_policy.json)")
    pb.add_argument("--slo-ms", type=float, default=100.0, help="latency objective, as `tandem serve` (default 100)")
    pb.add_argument(
        "--max-rate", type=float,
        help="requests/s the deployment will see at most: the load levels span it (default: the model's capacity"
        " alone, far above what Serve's proxy passes; measure it, e.g. with tandem loadtest)",
    )  # fmt: skip
    pb.add_argument("--episodes", type=int, default=48, help="simulated episodes (default 48)")
    pb.add_argument("--episode-s", type=float, default=20.0, help="simulated seconds per episode (default 20)")
    pb.add_argument("--seed", type=int, default=0)

    lt = subparsers.add_parser("loadtest", help="open-loop Poisson load against a served model (loopback only)")
    lt.add_argument("--url", default="http://127.0.0.1:8000", help="app URL (loopback only)")
    lt.add_argument("--pattern", default="constant", choices=["constant", "step", "sine"])
    lt.add_argument("--rate", type=float, default=100.0, help="mean requests/s (step: rate before the step)")
    lt.add_argument("--step-to", type=float, help="step: rate after the step (default 2x --rate)")
    lt.add_argument("--step-at", type=float, help="step: time of the step in s (default half the duration)")
    lt.add_argument("--period", type=float, default=10.0, help="sine: period in s (default 10); swing +-50%%")
    lt.add_argument("--duration", type=float, default=10.0, help="seconds of arrivals (default 10)")
    lt.add_argument("--max-requests", type=int, default=100_000, help="request bound (default 100000)")
    lt.add_argument("--timeout", type=float, default=2.0, help="per-request timeout in s (default 2)")
    lt.add_argument("--slo-ms", type=float, default=100.0, help="latency objective (default 100)")
    lt.add_argument("--route", default="predict", choices=["predict", "infer"], help="/predict or OIP infer")
    lt.add_argument("--model", default="tandem", help="model name (OIP route, metadata)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--plot", default="loadtest.png", help="PNG of latency and rate over time ('' for none)")
    lt.add_argument("--json", help="write the report as JSON here")


def pattern(args: argparse.Namespace) -> ArrivalPattern:
    """The arrival pattern named by --pattern (a class per variant, chosen once here at the boundary)."""
    if args.pattern == "constant":
        return Constant(args.rate)
    if args.pattern == "step":
        after = args.step_to if args.step_to is not None else 2 * args.rate
        at = args.step_at if args.step_at is not None else args.duration / 2
        return Step(args.rate, after, at)
    return Sine(args.rate, 0.5, args.period)


def deploy_config(args: argparse.Namespace):
    from serve_app.batching import BatchingConfig
    from serve_app.deploy import DeployConfig

    app = {
        "name": args.name,
        "version": args.version,
        "controller": args.controller,
        "batching": {**BatchingConfig.slo_fields(args.slo_ms / 1e3), **args.batching},
        "max_queued_requests": args.max_queued_requests,
    }
    if args.replicas is not None:
        app["num_replicas"] = args.replicas
    if args.gpus_per_replica is not None:
        app["num_gpus"] = args.gpus_per_replica
    if args.bandit_policy:
        if args.controller != "bandit":
            raise ValueError("--bandit-policy needs --controller bandit")
        app["bandit_policy"] = args.bandit_policy
    if args.canary:
        app["canary"] = {"artifact": args.canary, "weight": args.canary_weight, "window_s": args.canary_window_s}
    return DeployConfig(
        host=args.host, port=args.port, address=args.address, num_cpus=args.num_cpus, app=app,
        access_log=args.access_log, ingress=args.ingress, replicas_per_core=args.address is None,
    )  # fmt: skip


def load_config(args: argparse.Namespace):
    from serve_app.loadgen import LoadConfig

    return LoadConfig(
        pattern=pattern(args),
        duration_s=args.duration,
        max_requests=args.max_requests,
        timeout_s=args.timeout,
        slo_s=args.slo_ms / 1e3,
        route=args.route,
        model=args.model,
        seed=args.seed,
    )


def artifact_of(args: argparse.Namespace) -> str:
    """The artifact `tandem serve` deploys: the positional one, or run --run's in --storage (never both)."""
    from models import storage

    if args.storage is not None:
        storage.check(args.storage)
    if args.artifact is not None:
        if args.run_name is not None:
            raise ValueError("give either an artifact or --storage with --run, not both")
        storage.check(args.artifact)
        return args.artifact
    if args.run_name is None or args.storage is None:
        raise ValueError("serve needs an artifact (a directory or storage URI), or --storage URI with --run NAME")
    from tandem.pipeline import run_artifact

    return run_artifact(args.storage, args.run_name)


def dispatch(args: argparse.Namespace) -> int:
    """Runs `serve` or `loadtest`; returns the exit status (2 on bad input)."""
    try:
        if args.command == "serve":
            from serve_app.deploy import serve_artifact

            cfg = deploy_config(args)
            artifact = artifact_of(args)
            local = args.address is None  # the local Ray lives in this process
            if local:
                from tandem.local_ray import interrupt_on_sigterm

                interrupt_on_sigterm()
            try:
                url = serve_artifact(artifact, cfg)
                print(f"serving {artifact} at {url} (POST /predict, /v2/models/{args.name}/infer)")
                if local:
                    print("Ctrl-C to stop", flush=True)
                    while True:
                        time.sleep(3600)
            except KeyboardInterrupt:  # also while it starts: what started is stopped below
                pass
            finally:
                if local:  # Serve first: its controller stops HAProxy and the replicas, then Ray
                    from tandem.local_ray import shutdown_embedded

                    shutdown_embedded()
            return 0
        if args.command == "pretrain-bandit":
            return pretrain(args)
        if args.command == "loadtest":
            from serve_app.deploy import run_loadtest

            report = run_loadtest(args.url, load_config(args), args.plot or None)
            print(report.summary())
            if args.plot:
                print(f"plot: {args.plot}")
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(report.to_dict(), f, indent=2)
            return 0
    except (ValueError, TypeError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2
    raise ValueError(f"command must be serve, pretrain-bandit or loadtest, got {args.command!r}")


def pretrain(args: argparse.Namespace) -> int:
    """`tandem pretrain-bandit`: times the artifact, trains a Bandit in the simulator, writes the policy."""
    from serve_app.pretrain import PretrainConfig, capacity, measure_service_time, pretrain_bandit

    cfg = PretrainConfig(
        slo_s=args.slo_ms / 1e3,
        max_rate=args.max_rate,
        episodes=args.episodes,
        duration_s=args.episode_s,
        seed=args.seed,
    )
    service = measure_service_time(args.artifact)
    ms = ", ".join(f"t({b}) {t * 1e3:.2f}" for b, t in zip(service.batch_sizes, service.seconds, strict=True))
    print(f"service time (ms, 1 thread): {ms}; capacity {capacity(service):.0f} items/s")
    if args.max_rate is None:
        print("load levels span the model's capacity (no --max-rate); through Serve's proxy far less is reachable")
    step = max(1, cfg.episodes // 8)

    def progress(e: int, reward: float) -> None:
        if (e + 1) % step == 0 or e + 1 == cfg.episodes:
            print(f"  episode {e + 1}/{cfg.episodes}: mean reward {reward:.3f}", flush=True)

    bandit, curve = pretrain_bandit(service, cfg, progress)
    bandit.save(args.out)
    k = max(1, len(curve) // 4)
    print(
        f"wrote {args.out}: mean reward {sum(curve[:k]) / k:.3f} over the first {k} episodes, "
        f"{sum(curve[-k:]) / k:.3f} over the last {k}; serve it with "
        f"`tandem serve ARTIFACT --controller bandit --bandit-policy {args.out} --slo-ms {args.slo_ms:g}`"
    )
    return 0
