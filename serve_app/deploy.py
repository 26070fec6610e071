"""Deploying the Serve app declaratively from Python: what `tandem serve` and `tandem loadtest` call.

Everything goes through the declarative path (a `ServeDeploySchema` applied by the Serve controller, as
`serve deploy serve_app/serve_config.yaml` does), never `serve.run`: re-applying a config whose import path,
args and runtime env are unchanged keeps the application's code version, so Serve only pushes the changed
`user_config`s to the running replicas through `reconfigure` (ray/serve/_private/application_state.py,
`apply_app_config`). `serve.run` of a rebuilt app would get a fresh random version and restart every replica.
So a hot update keeps `args` (they name the artifact the app was first deployed with) and overrides the
deployments' `user_config`.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from serve_app.config import AppConfig, ModelUserConfig, default_num_gpus, one_machine_num_replicas
from serve_app.loadgen import LoadConfig, LoadReport, check_loopback, generator_process, plot, run_load

if TYPE_CHECKING:
    from ray.serve.schema import DeploymentDetails

IMPORT_PATH = "serve_app.app:build_app"
DEPLOY_TIMEOUT_S = 300
"""How long a first deploy may take to reach RUNNING (TimeoutError after; RuntimeError at once when it fails)."""
# build_app's backpressure_config is {503, retry_after_s 1}; a different value while a bound is lifted makes Serve
# push the deployment config to the replicas (roll_out).
_LIFTED_BACKPRESSURE = {"status_code": 503, "retry_after_s": 2}


@dataclass(kw_only=True, slots=True)
class DeployConfig:
    """Where and how to serve; `app` holds `serve_app.config.AppConfig` fields other than `artifact`."""

    host: str | None = None
    """HTTP host of Serve's frontend (HAProxy or the proxy) and of the replicas' direct-ingress ports; None:
    `serve_app.placement.http_host` (loopback for a local Ray this process starts, 0.0.0.0 on a cluster given
    by `address`, where the head's HAProxy must reach replicas on other nodes, also those that join later)."""
    port: int = 8000
    """HTTP port of Serve's proxy."""
    app_name: str = "tandem"
    """Serve application name."""
    address: str | None = None
    """Ray cluster to deploy to ("auto", "ray://..."); None starts a local Ray in this process."""
    num_cpus: int = 8
    """Logical CPUs of a local Ray (over-declared: 2 real cores cannot run proxy, controller and replicas
    otherwise, shared/ENV.md)."""
    app: dict[str, Any] = field(default_factory=dict)
    """AppConfig fields (name, controller, batching, canary, num_replicas, ...)."""
    access_log: bool = False
    """Serve's per-request access log lines (proxy and replicas). Off by default: a formatted log line per
    request is work on the request path, and tandem's metrics count every request and error already."""
    replicas_per_core: bool = False
    """When `app` names no num_replicas (nor autoscaling) and the replicas run on CPU: one replica per core of this
    machine (serve_app.config.one_machine_num_replicas), for a Ray that runs on this machine alone (`tandem serve`
    without --address, `tandem run` on its embedded Ray set it); else AppConfig's 1."""
    ingress: str = "haproxy"
    """HTTP ingress of a local Ray this process starts: "haproxy" (Ray's HAProxy ingress, direct to the replicas;
    tandem/local_ray.py) or "proxy" (Serve's Python proxy). A cluster (`address`) has what its nodes were started
    with (RAY_SERVE_ENABLE_HA_PROXY)."""

    def __post_init__(self) -> None:
        from tandem.local_ray import INGRESSES

        if self.ingress not in INGRESSES:
            raise ValueError(f"ingress must be one of {list(INGRESSES)}, got {self.ingress!r}")
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be an int in (0, 65536), got {self.port!r}")
        if not isinstance(self.access_log, bool):
            raise ValueError(f"access_log must be true or false, got {self.access_log!r}")
        if not isinstance(self.replicas_per_core, bool):
            raise ValueError(f"replicas_per_core must be true or false, got {self.replicas_per_core!r}")
        if self.host is not None and (not isinstance(self.host, str) or not self.host):
            raise ValueError(f"host must be a non-empty string or None, got {self.host!r}")
        if "artifact" in self.app:
            raise ValueError("app must not hold 'artifact': pass the artifact path to serve_artifact")

    def app_config(self, artifact: str) -> AppConfig:
        return AppConfig.from_dict({**self.app, "artifact": str(artifact)})

    @property
    def url(self) -> str:
        from serve_app.placement import client_host

        return f"http://{client_host(self.host)}:{self.port}"

    def http_options(self) -> dict[str, Any]:
        """Serve's http_options: the host resolved against the connected cluster when None."""
        from serve_app.placement import http_host

        # address None: this process starts (or started) its own local Ray; an address: a cluster it joined
        return {"host": self.host if self.host is not None else http_host(self.address is None), "port": self.port}


def _ensure_serve(cfg: DeployConfig):
    import ray
    from ray import serve
    from ray.serve.context import _check_cached_client_alive, _get_global_client

    if not ray.is_initialized():
        if cfg.address is None:
            from tandem.local_ray import init_embedded

            init_embedded(cfg.num_cpus, cfg.ingress, include_dashboard=False)
        else:
            ray.init(address=cfg.address)
    # Serve running already (started by this process, e.g. tandem.pipeline.start_serving, or by an earlier call
    # here): its client, without a second serve.start, which only connects again (two calls to the controller
    # and a "Connecting to existing Serve app" line, three of them in each roll_out). Checked alive: a client
    # cached in this process outlives its controller when another driver shuts Serve down (a `tandem serve` that
    # exits on the same cluster), and deploying through it failed "Can't find actor" (a fresh-clone CI run, 17
    # errors); serve.start then starts Serve again, or connects to one another driver started.
    client, _ = _check_cached_client_alive()
    if client is not None:
        return client
    _wait_previous_serve_gone()
    serve.start(http_options=cfg.http_options(), logging_config=_logging(cfg))
    return _get_global_client()


def _wait_previous_serve_gone(timeout_s: float = 60.0) -> None:
    """With no Serve controller running, waits until the proxy actors of an earlier `serve.shutdown()` are gone:
    that shutdown kills them asynchronously, and a `serve.start` meanwhile picked up the dying HAProxyManager by
    its name and failed (ActorDiedError, seen when test modules run one after another)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE, SERVE_PROXY_NAME

    deadline = time.monotonic() + timeout_s
    while True:
        names = {
            a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == SERVE_NAMESPACE
        }
        if SERVE_CONTROLLER_NAME in names or not any(n.startswith(SERVE_PROXY_NAME) for n in names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"proxy actors of a stopped Serve still alive after {timeout_s:.0f} s: {sorted(names)}")
        time.sleep(0.2)


def _logging(cfg: DeployConfig) -> dict[str, Any]:
    return {"enable_access_log": cfg.access_log}


def app_schema(
    artifact: str,
    cfg: DeployConfig,
    user_configs: dict[str, dict[str, Any]] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
):
    """The declarative config of the app serving `artifact`, with `user_configs` (deployment name -> its whole
    new user_config) and other deployment `options` (name -> {option: value}) overriding what `build_app` sets."""
    from ray.serve.schema import ServeDeploySchema

    app_cfg = cfg.app_config(artifact)
    gpus = replica_gpus(app_cfg)
    # fixed facts of the machine and the cluster: every config applied to the app (a hot update) asks for the same
    if cfg.replicas_per_core and "num_replicas" not in cfg.app and app_cfg.autoscaling is None and gpus == 0:
        from serve_app.placement import serve_node_cpus

        n = one_machine_num_replicas(
            serve_node_cpus(), cpus_per_replica=app_cfg.num_cpus, deployments=2 if app_cfg.canary else 1
        )
        app_cfg = replace(app_cfg, num_replicas=n)
    overrides: dict[str, dict[str, Any]] = {n: {"user_config": uc} for n, uc in (user_configs or {}).items()}
    # The replicas' resource request from AppConfig (num_gpus resolved against the cluster) and their placement
    # (serve_app/placement.py, as build_app sets it: options given here replace the code's ray_actor_options
    # whole); the same in every config applied to the app, so a hot update does not restart replicas for it.
    from serve_app.placement import replica_placement

    actor = {**app_cfg.ray_actor_options(gpus), **replica_placement()}
    for name in ("Model", "Canary") if app_cfg.canary is not None else ("Model",):
        overrides.setdefault(name, {})["ray_actor_options"] = dict(actor)
    for name, opts in (options or {}).items():
        overrides.setdefault(name, {}).update(opts)
    deployments = [{"name": name, **o} for name, o in overrides.items()]
    return ServeDeploySchema(
        **{
            "http_options": cfg.http_options(),
            "logging_config": _logging(cfg),
            "applications": [
                {
                    "name": cfg.app_name,
                    "route_prefix": "/",
                    "import_path": IMPORT_PATH,
                    "args": app_cfg.to_dict(),
                    "deployments": deployments,
                    "logging_config": _logging(cfg),
                }
            ],
        }
    )


def replica_gpus(app_cfg: AppConfig) -> float:
    """GPUs per model replica: AppConfig.num_gpus, or when None, `default_num_gpus` of the connected cluster's
    GPUs and the artifact's quantization scheme (its manifest, or a serving set's forms, read from storage only
    where there are GPUs)."""
    if app_cfg.num_gpus is not None:
        return app_cfg.num_gpus
    import ray

    gpus = ray.cluster_resources().get("GPU", 0.0) if ray.is_initialized() else 0.0
    if gpus < 1:
        return 0.0
    from models import storage
    from models.artifact import read_serving_set

    served = read_serving_set(app_cfg.artifact)
    if served is not None:  # a GPU where one of its forms runs on it (FP8); each replica picks its form at load
        return max(default_num_gpus(gpus, scheme) for scheme in served["forms"])
    manifest = json.loads(storage.read_text(storage.join(app_cfg.artifact, "manifest.json")))
    return default_num_gpus(gpus, manifest["quantization"]["scheme"])


def wait_ready(url: str, timeout_s: float = 60.0, consecutive: int = 10) -> None:
    """Polls GET /v2/health/ready until it answers 200 `consecutive` times in a row, each on a new connection
    (~1 s): right after a deploy HAProxy reloads its config more than once, and a burst sent at the first 200
    met a few 404s from a process still on the config without the app."""
    deadline = time.monotonic() + timeout_s
    streak = 0
    while streak < consecutive:
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                streak = streak + 1 if r.status == 200 else 0
        except OSError:
            streak = 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
        time.sleep(0.1)


def serve_artifact(path: str, cfg: DeployConfig) -> str:
    """Deploys the app serving artifact `path` (starting a local Ray unless `cfg.address`); returns its URL once
    it answers /v2/health/ready."""
    client = _ensure_serve(cfg)
    client.deploy_apps(app_schema(str(path), cfg), _blocking=False)
    # not deploy_apps' own blocking wait: it gives up after a fixed 60 s, which a replica on a loaded 2-core
    # worker node overran fetching the artifact from S3 and compiling its inference form (tests/test_multinode.py)
    client._wait_for_application_running(cfg.app_name, timeout_s=DEPLOY_TIMEOUT_S)
    # a re-deploy that keeps the replicas (same args) is a hot update: RUNNING before the swap (_wait_served)
    app_cfg = cfg.app_config(path)
    models = {"Model": asdict(app_cfg.model_user_config())}
    if app_cfg.canary is not None:
        models["Canary"] = asdict(app_cfg.canary_user_config())
    _wait_served(cfg, list(models), models)
    wait_ready(cfg.url)
    return cfg.url


def update_user_configs(
    path: str,
    cfg: DeployConfig,
    user_configs: dict[str, dict[str, Any]],
    options: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Re-applies the app first deployed with artifact `path` and `cfg`, with new user_configs for the named
    deployments ("Model", "Canary", "Router"): an in-place reconfigure, no replica restarted. Returns once the
    controller has accepted the config (replicas reconfigure right after). `options`: other deployment options
    for this config only (the next update drops them)."""
    client = _ensure_serve(cfg)
    merged = {**current_user_configs(client, cfg.app_name), **user_configs}  # keep earlier updates' overrides
    client.deploy_apps(app_schema(str(path), cfg, merged, options), _blocking=True)


def roll_out(path: str, cfg: DeployConfig, user_configs: dict[str, dict[str, Any]], timeout_s: float = 60.0) -> None:
    """`update_user_configs` for model deployments, without losing requests to Serve's caller-side bound.

    While Serve reconfigures a replica it routes nothing to it, so the requests of that window wait in the
    proxy's (and handles') queue, where `max_queued_requests` answers the excess 503: measured with one replica
    and a bound of 16, 11-13 of 1448 requests in a hot update at 181 req/s (0 in control runs without the update;
    0 with this function).
    So the bound is lifted for the update and restored once the updated replicas have served their grace period
    (ModelUserConfig.update_grace_s), in which they admit the backlog. With the HAProxy ingress the bound is
    enforced by each replica itself (direct ingress) on its own copy of the deployment config, which a
    light-weight option such as `max_queued_requests` never reaches; `backpressure_config` is pushed to the
    replicas (Serve reconfigures them for it), so the lift and the restore each change it too."""
    models = [n for n in user_configs if n in ("Model", "Canary")]
    if not models or not _bounded(cfg, models):
        update_user_configs(path, cfg, user_configs)
        _wait_served(cfg, models, user_configs)
        return
    lifted = {n: {"max_queued_requests": -1, "backpressure_config": _LIFTED_BACKPRESSURE} for n in models}
    # Lifted in a config of its own first, so that the callers' routers (a long-poll push) and the replicas (a
    # reconfigure) have it before the update takes any replica out of their routing (in one step with the update,
    # 1 request in 3 runs was refused; those runs had no control, so it may have been a steady-state refusal).
    update_user_configs(path, cfg, {}, options=lifted)
    try:
        time.sleep(0.5)  # the controller marks the replicas UPDATING on its next loop
        for name in models:
            wait_reconfigured(cfg, name, None, timeout_s)
        update_user_configs(path, cfg, user_configs, options=lifted)
        grace = max(ModelUserConfig.from_dict(user_configs[n]).update_grace_s for n in models)
        _wait_served(cfg, models, user_configs)  # every replica RUNNING with the update swapped in
        time.sleep(grace)
    finally:  # the bound back even when the update failed (no replica touched)
        update_user_configs(path, cfg, {})


def _wait_served(cfg: DeployConfig, models: list[str], user_configs: dict[str, dict[str, Any]]) -> None:
    """Until every replica of `models` serves its new user_config: a replica's reconfigure returns at once and
    swaps the new model in when it is loaded and warmed up (ModelServer.reconfigure; serve_app/served.py), which
    may take as long as a first deploy's load."""
    for name in models:
        wait_served(cfg, name, user_configs[name], DEPLOY_TIMEOUT_S)


def _bounded(cfg: DeployConfig, deployments: list[str]) -> bool:
    """Whether any of `deployments` runs with Serve's caller-side bound in force (build_app applies it only with
    the Python proxy ingress): lifting and restoring a bound that is not there would only reconfigure replicas
    twice more (and a hot update through HAProxy that did so met 136 404s in 1 of 9 runs)."""
    from ray.serve.schema import ServeInstanceDetails

    app = ServeInstanceDetails(**_ensure_serve(cfg).get_serve_details()).applications.get(cfg.app_name)
    if app is None:
        return False
    return any(
        d in app.deployments and app.deployments[d].deployment_config.max_queued_requests != -1 for d in deployments
    )


def wait_deployment(
    cfg: DeployConfig,
    deployment: str,
    pending: Callable[[DeploymentDetails | None], str | None],
    timeout_s: float,
    period_s: float = 0.2,
) -> None:
    """Polls Serve's details of `deployment` (None while the app or the deployment is not there) until
    `pending(details)` returns None; what it returns otherwise (what is still awaited) goes into the TimeoutError
    raised after `timeout_s`. `pending` may raise to stop waiting."""
    from ray.serve.schema import ServeInstanceDetails

    client = _ensure_serve(cfg)
    deadline = time.monotonic() + timeout_s
    while True:
        app = ServeInstanceDetails(**client.get_serve_details()).applications.get(cfg.app_name)
        missing = pending(app.deployments.get(deployment) if app is not None else None)
        if missing is None:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment} after {timeout_s:.0f} s: {missing}")
        time.sleep(period_s)


def wait_reconfigured(
    cfg: DeployConfig, deployment: str, user_config: dict[str, Any] | None, timeout_s: float = 60.0
) -> None:
    """Waits until the controller targets `user_config` (None: whatever it targets now) for `deployment` and
    every replica of it is RUNNING again (reconfigured) with the deployment HEALTHY."""

    def pending(d: DeploymentDetails | None) -> str | None:
        if (
            d is not None
            and (user_config is None or d.deployment_config.user_config == user_config)
            and d.status == "HEALTHY"
            and all(r.state == "RUNNING" for r in d.replicas)
        ):
            return None
        return f"not reconfigured: {None if d is None else (d.status, [r.state for r in d.replicas])}"

    wait_deployment(cfg, deployment, pending, timeout_s, period_s=0.1)


def wait_served(
    cfg: DeployConfig, deployment: str, user_config: dict[str, Any], timeout_s: float = 300.0, recheck_s: float = 5.0
) -> None:
    """Waits until every replica of `deployment` is RUNNING and serves `user_config` (swapped in, as its record
    in serve_app/served.py says); RuntimeError at once when a replica reports it could not swap it in (it serves
    its previous model), TimeoutError after `timeout_s`.

    Between two looks at the controller (at most every `recheck_s`, to see replicas come and go), only the
    replicas' own records are read, one small GCS read each per 0.2 s: Serve's details of the whole instance (the
    controller reads its config checkpoint from the GCS and builds them, the caller parses them) asked for 5
    times a second while the update loaded were a second load beside the replica it updates, whose admission
    control then refused some requests (8, 4 and 0 of 2676 at 0.66x capacity in bench/serving.py's roll_out
    runs; 0 in the plain re-applies, which do not wait)."""
    from serve_app.served import normalize, read

    target = normalize(user_config)
    deadline = time.monotonic() + timeout_s

    def swapped_of(ids: list[str]) -> list[str]:
        recs = {rid: read(cfg.app_name, deployment, rid) for rid in ids}
        for rid, rec in recs.items():
            if rec is not None and rec["user_config"] == target and rec["error"] is not None:
                raise RuntimeError(
                    f"{deployment} replica {rid} could not swap in {target['artifact']} (it serves its previous"
                    f" model): {rec['error']}"
                )
        return [rid for rid, rec in recs.items() if rec is not None and rec["user_config"] == target]

    def pending(d: DeploymentDetails | None) -> str | None:
        # a replica on its way out (scale-down, replacement) serves nothing new; none at all (autoscaled to zero)
        # means the next one starts with the target
        replicas = [r for r in d.replicas if r.state != "STOPPING"] if d is not None else []
        if d is not None and not replicas and d.status == "HEALTHY":
            return None
        ids = [r.replica_id for r in replicas]
        swapped = swapped_of(ids)
        until = min(deadline, time.monotonic() + recheck_s)
        while len(swapped) < len(ids) and time.monotonic() < until:
            time.sleep(0.2)
            swapped = swapped_of(ids)
        # RUNNING when the controller was asked, swapped since: a background swap keeps the replica RUNNING
        if ids and len(swapped) == len(ids) and all(r.state == "RUNNING" for r in replicas):
            return None
        what = f"{target['artifact']} (version {target['version']})"
        return (
            f"{what} not served on every replica: swapped {swapped} of { ({r.replica_id: r.state for r in replicas}) }"
        )

    wait_deployment(cfg, deployment, pending, timeout_s)


def current_user_configs(client, app_name: str) -> dict[str, dict[str, Any]]:
    """The user_config overrides of the config last applied to `app_name` (deployment name -> user_config)."""
    from ray.serve.schema import ServeInstanceDetails

    details = ServeInstanceDetails(**client.get_serve_details())
    app = details.applications.get(app_name)
    if app is None or app.deployed_app_config is None:
        return {}
    return {d.name: d.user_config for d in app.deployed_app_config.deployments if isinstance(d.user_config, dict)}


def hot_update(
    path: str, cfg: DeployConfig, new_artifact: str, version: str | None = None, *, deployment: str = "Model"
) -> dict[str, Any]:
    """Rolls `new_artifact` (labelled `version`) out to `deployment` of the app first deployed with artifact
    `path` and `cfg`, in place. Returns the user_config applied."""
    app_cfg = cfg.app_config(path)
    base = app_cfg.canary_user_config() if deployment == "Canary" else app_cfg.model_user_config()
    user = asdict(base)
    user.update(artifact=str(new_artifact), version=version)
    ModelUserConfig.from_dict(user)  # validate before the controller sees it
    roll_out(path, cfg, {deployment: user})
    return user


def finish_rollout(path: str, cfg: DeployConfig) -> str:
    """Ends a canary rollout that the Router has decided: when promoted, the stable `Model` is hot-updated to
    the canary's model (in place); either way the Router starts a new policy with weight 0, so all traffic goes
    to `Model` until the next canary. Returns the decision ("promoted" or "rolled_back")."""
    client = _ensure_serve(cfg)
    with urllib.request.urlopen(f"{cfg.url}/canary", timeout=10) as r:
        status = json.load(r)
    if status["state"] not in ("promoted", "rolled_back"):
        raise ValueError(f"canary rollout must be decided (promoted or rolled_back), got {status['state']!r}")
    updates = {"Router": {**status["config"], "weight": 0.0}}
    if status["state"] == "promoted":
        current = current_user_configs(client, cfg.app_name)
        updates["Model"] = current.get("Canary") or asdict(cfg.app_config(path).canary_user_config())
    roll_out(path, cfg, updates)
    return status["state"]


def run_loadtest(url: str, cfg: LoadConfig, plot_path: str | None = None) -> LoadReport:
    """Runs one open-loop load test against the app at `url` (loopback only); writes the PNG if `plot_path`.

    The load is generated in a process of its own (spawned, not forked: the caller may run Ray's threads), so
    that the caller cannot delay its sends: `tandem run`'s driver holds Ray's threads and the job's heap, and a
    generator sharing its GIL sends late, in bursts, which count against the server (latency is measured from
    the scheduled send)."""
    url = check_loopback(url)
    with generator_process() as pool:
        report = pool.submit(run_load, url, cfg).result()
    if plot_path is not None:
        plot(report, plot_path)
    return report
