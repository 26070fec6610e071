"""The Serve app's configuration: what `build_app` takes (`AppConfig`, the `args:` of a Serve config), what a
Model replica can change in place (`ModelUserConfig`, its Serve `user_config`), and the canary rollout's policy
(`CanaryConfig`, the Router's `user_config`). Plain dataclasses, validated on construction; no Serve imports."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from models import storage
from serve_app.batching import AIMD, Bandit, BatchingConfig, Controller, SLOModel, Static, load_bandit_policy

CONTROLLERS: dict[str, type[Controller]] = {"static": Static, "aimd": AIMD, "slo_model": SLOModel, "bandit": Bandit}
"""Names a user_config may give for `controller` (plus "unbatched": no @serve.batch at all)."""
UNBATCHED = "unbatched"


@dataclass(kw_only=True, slots=True)
class ModelUserConfig:
    """What a running Model replica can change in place (its Serve `user_config`)."""

    artifact: str
    """Artifact directory (models/artifact.py): a local path every replica can read, or a storage URI
    (models/storage.py: s3://, gs://, file://) that each replica downloads to its own node before loading."""
    version: str | None = None
    """Version reported to clients and in the model_version metric (default: the weights' sha256[:12])."""
    controller: str = "slo_model"
    """Batching controller: static, aimd, slo_model (default), bandit, or unbatched."""
    batching: dict[str, Any] = field(default_factory=dict)
    """BatchingConfig fields (serve_app/batching/settings.py); unknown keys are an error."""
    admission: bool = True
    """Admission control (503 + Retry-After when the SLO cannot be met); False serves like plain `@serve.batch`
    (baselines in bench/serving.py)."""
    bandit_policy: str | None = None
    """With controller "bandit": a policy saved by `tandem pretrain-bandit` (Bandit.save, JSON) that the
    replica's bandit starts from instead of empty tables; it keeps learning online. Its SLO must be this
    config's (its rewards counted misses against it)."""
    update_grace_s: float = 2.0
    """Seconds after this config is swapped in during which admission control refuses nothing (Serve's
    max_ongoing_requests still bounds the replica). The replica serves on while an update loads and swaps the
    new model and controller in between batches (ModelServer.reconfigure), but the new controller's service-time
    fit comes from the warm-up alone and its admission calibration starts from scratch, and the load's thread
    competed with the serving loop for the cores: refusing on those predictions, or a backlog the load left
    (max_queue_len, a predicted latency over the SLO), would turn a planned update into errors."""

    def __post_init__(self) -> None:
        if not isinstance(self.admission, bool):
            raise ValueError(f"admission must be true or false, got {self.admission!r}")
        p = self.bandit_policy
        if p is not None and (not isinstance(p, str) or not p):
            raise ValueError(f"bandit_policy must be a non-empty path string or null, got {p!r}")
        if p is not None and self.controller != "bandit":
            raise ValueError(f"bandit_policy is read only by controller 'bandit', got controller {self.controller!r}")
        g = self.update_grace_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 600:
            raise ValueError(f"update_grace_s must be a number of seconds in [0, 600], got {g!r}")
        if not isinstance(self.artifact, str) or not self.artifact:
            raise ValueError(f"artifact must be a non-empty path string, got {self.artifact!r}")
        storage.check(self.artifact)  # an unsupported scheme is refused here, not in every replica
        if self.version is not None and not isinstance(self.version, str):
            raise ValueError(f"version must be a string or null, got {self.version!r}")
        if self.controller != UNBATCHED and self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {[*CONTROLLERS, UNBATCHED]}, got {self.controller!r}")
        BatchingConfig.from_dict(self.batching)  # validate now, not in the replica

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelUserConfig:
        return cls(**_known(cls, d, "model user_config"))

    def batching_config(self) -> BatchingConfig:
        return BatchingConfig.from_dict(self.batching)

    def build_controller(self) -> Controller:
        cfg = self.batching_config()
        if self.bandit_policy is not None:
            return load_bandit_policy(self.bandit_policy, cfg)
        return CONTROLLERS[self.controller if self.controller != UNBATCHED else "static"](cfg)


@dataclass(kw_only=True, slots=True)
class AppConfig:
    """`build_app`'s arguments (the `args:` of a Serve config, or key=value pairs of `serve run`)."""

    artifact: str
    """Artifact directory served by the `Model` deployment."""
    name: str = "tandem"
    """Model name in the OIP routes (/v2/models/{name})."""
    version: str | None = None
    """Version label of `artifact` (default: its weights' sha256[:12])."""
    controller: str = "slo_model"
    """Batching controller: static, aimd, slo_model, bandit, unbatched."""
    batching: dict[str, Any] = field(default_factory=dict)
    """BatchingConfig fields."""
    bandit_policy: str | None = None
    """With controller "bandit": a pre-trained policy (ModelUserConfig.bandit_policy)."""
    canary: dict[str, Any] | None = None
    """{"artifact", "version"?, plus serve_app.router.CanaryConfig fields}: adds a Canary deployment and a Router."""
    num_replicas: int = 1
    """Replicas of each model deployment (ignored with autoscaling). `tandem serve` and `tandem run` on a Ray they
    start themselves default to one per core instead (`one_machine_num_replicas`)."""
    autoscaling: dict[str, Any] | None = None
    """Serve autoscaling_config for the model deployments (min_replicas, max_replicas, ...)."""
    max_body_bytes: int = 1 << 20
    """Requests with a larger body get 413."""
    max_instances: int = 64
    """Images per request above this get 422."""
    num_cpus: float = 1.0
    """Logical CPUs per model replica."""
    num_gpus: float | None = None
    """GPUs per model replica (its ray_actor_options). None: decided at deploy time by `default_num_gpus`: 1
    where the cluster has GPUs and the artifact's scheme runs on one (GPU_SCHEMES), else 0."""
    max_queued_requests: int | None = None
    """Serve's caller-side bound (proxy, handles): requests waiting for a replica beyond this many are answered 503
    (with Retry-After) by the proxy itself, before any replica sees them. None: unbounded (Serve's default).
    Applied only with Serve's Python proxy (`--ingress proxy`): with HAProxy there is no proxy queue (build_app)."""
    torch_threads: int = 1
    """torch intra-op threads per replica (small CNNs on small batches: 1 is fastest and leaves cores to the
    proxy)."""
    direct_routes: bool = True
    """POST /predict and the OIP infer routes answered straight from the ASGI messages, past FastAPI (same checks,
    same answers; serve_app/routes.py `Ingress`); False: through FastAPI like the other routes
    (bench/serve_direct_routes.py measures the two)."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_body_bytes", "max_instances", "torch_threads"):
            v = getattr(self, name)
            if isinstance(v, str) and v.isdigit():  # `serve run ... key=value` passes strings
                v = int(v)
                setattr(self, name, v)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.direct_routes, str) and self.direct_routes.lower() in ("true", "false"):
            self.direct_routes = self.direct_routes.lower() == "true"  # `serve run ... direct_routes=false`
        if not isinstance(self.direct_routes, bool):
            raise ValueError(f"direct_routes must be a bool, got {self.direct_routes!r}")
        if isinstance(self.max_queued_requests, str) and self.max_queued_requests.isdigit():
            self.max_queued_requests = int(self.max_queued_requests)
        q = self.max_queued_requests
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 1):
            raise ValueError(f"max_queued_requests must be null or an int >= 1, got {q!r}")
        self.num_cpus = float(self.num_cpus)
        if not self.num_cpus >= 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus!r}")
        g = self.num_gpus
        if g is not None:
            try:
                g = float(g)  # `serve run ... num_gpus=1` passes a string
            except (TypeError, ValueError):
                raise ValueError(f"num_gpus must be a number >= 0 or null, got {self.num_gpus!r}") from None
            if isinstance(self.num_gpus, bool) or not g >= 0:
                raise ValueError(f"num_gpus must be a number >= 0 or null, got {self.num_gpus!r}")
            self.num_gpus = g
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"name must be a non-empty string without '/', got {self.name!r}")
        for key in ("batching", "canary", "autoscaling"):
            v = getattr(self, key)
            if isinstance(v, str):
                setattr(self, key, json.loads(v))  # `serve run ... batching='{"slo_s": 0.05}'`
        self.model_user_config()  # validates artifact/version/controller/batching
        if self.canary is not None:
            if not isinstance(self.canary, dict) or "artifact" not in self.canary:
                raise ValueError(f"canary must be a dict with an 'artifact' key, got {self.canary!r}")
            self.canary_user_config()
            self.canary_policy()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AppConfig:
        return cls(**_known(cls, d, "app args"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_user_config(self) -> ModelUserConfig:
        return ModelUserConfig(
            artifact=self.artifact,
            version=self.version,
            controller=self.controller,
            batching=dict(self.batching),
            bandit_policy=self.bandit_policy,
        )

    def canary_user_config(self) -> ModelUserConfig:
        assert self.canary is not None
        return ModelUserConfig(
            artifact=self.canary["artifact"],
            version=self.canary.get("version"),
            controller=self.controller,
            batching=dict(self.batching),
            bandit_policy=self.bandit_policy,
        )

    def canary_policy(self) -> dict[str, Any]:
        """The canary dict without the model keys: CanaryConfig fields (validated)."""
        assert self.canary is not None
        policy = {k: v for k, v in self.canary.items() if k not in ("artifact", "version")}
        CanaryConfig.from_dict(policy)
        return policy

    def ray_actor_options(self, num_gpus: float) -> dict[str, Any]:
        """A model replica's resource request, with `num_gpus` resolved (see `default_num_gpus`)."""
        return {"num_cpus": self.num_cpus, "num_gpus": float(num_gpus)}

    def max_ongoing_requests(self) -> int:
        """A replica accepts the largest batch plus the bounded queue, so requests queue where admission
        control sees them (not in the proxy's router, which backs off and can collapse, shared/ENV.md)."""
        b = self.model_user_config().batching_config()
        return b.max_batch_size + (b.max_queue_len if b.max_queue_len is not None else 256)


REPLICA_MEMORY_BYTES = 1 << 30
"""Memory set aside per replica when `one_machine_num_replicas` counts how many fit: about twice what one replica
of the bench's `tiny` model holds resident after its load runs (0.57 GB; bench/results/serve_replicas.json)."""


def one_machine_num_replicas(
    logical_cpus: float,
    *,
    cpus_per_replica: float = 1.0,
    deployments: int = 1,
    cores: int | None = None,
    memory_bytes: int | None = None,
) -> int:
    """Replicas per model deployment when the user names none and tandem runs the whole cluster on one machine
    (`tandem serve` without --address, `tandem run` on its embedded Ray): one per core of the machine, shared
    among the model deployments (`deployments`: 2 with a canary), at most what the cluster's `logical_cpus`
    (`cpus_per_replica` each) and the machine's memory (REPLICA_MEMORY_BYTES each) allow, and at least 1.

    Why per core: a replica is one Python process whose event loops and forward thread share one GIL, so it uses
    about one core however many the machine has (1.2-1.3 cores of our process tree on 2, load generator
    included). Measured on 2 cores through HAProxy (bench/serve_replicas.py, 3 interleaved repeats): 2 replicas
    served 1.33x (adaptive controller) and 1.56x (Serve's static defaults) what 1 served within the SLO, and held
    a +-50 % sine at one replica's unbatched capacity (930/s) with no 503 in all 6 runs, where 1 replica refused
    requests in 5 of 6 (attainment 0.84-1.00); memory 1.11 GB against 0.57. On a cluster tandem joined, the
    count stays 1 (AppConfig.num_replicas): the head's cores say nothing of the nodes the replicas land on.
    `cores` and `memory_bytes` default to this machine's (CPU affinity, physical memory): fixed facts, so every
    config applied to an app (a hot update re-applies it) asks for the same count."""
    if isinstance(deployments, bool) or not isinstance(deployments, int) or deployments < 1:
        raise ValueError(f"deployments must be an int >= 1, got {deployments!r}")
    if not cpus_per_replica >= 0 or not logical_cpus >= 0:
        raise ValueError(f"cpus must be >= 0, got logical_cpus={logical_cpus!r}, cpus_per_replica={cpus_per_replica!r}")
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    n = cores // deployments
    if cpus_per_replica > 0:
        n = min(n, int(logical_cpus // cpus_per_replica) // deployments)
    n = min(n, memory_bytes // REPLICA_MEMORY_BYTES // deployments)
    return max(1, int(n))


GPU_SCHEMES = ("fp8",)
"""Artifact quantization schemes made for a GPU (FP8 `_scaled_mm` needs CUDA sm_89+; elsewhere models/quantize.py
falls back to a slow dequantized matmul). fp32 and the x86 INT8 (PT2E) artifacts are served on CPU by the
replica, so a GPU given to them would sit idle."""


def default_num_gpus(cluster_gpus: float, scheme: str) -> float:
    """GPUs per replica when AppConfig.num_gpus is None: 1 where the cluster has a GPU and the artifact's
    quantization `scheme` (its manifest) runs on one, else 0."""
    if not isinstance(scheme, str):
        raise TypeError(f"scheme must be a string, got {scheme!r}")
    return 1.0 if cluster_gpus >= 1 and scheme in GPU_SCHEMES else 0.0


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} keys must be among {sorted(known)}, got unknown {unknown}")
    return d


@dataclass(kw_only=True, slots=True)
class CanaryConfig:
    """Traffic share and the thresholds of the automatic decision."""

    weight: float = 0.1
    """Share of requests sent to the canary while it runs."""
    window_s: float = 10.0
    """Comparison window (seconds)."""
    min_requests: int = 20
    """Requests each side needs in a window before it counts."""
    max_error_rate_delta: float = 0.01
    """Roll back when canary error rate > stable error rate + this."""
    max_p99_ratio: float = 1.5
    """Roll back when canary p99 > this * stable p99 + p99_slack_s."""
    p99_slack_s: float = 0.005
    """Absolute slack on the p99 comparison (seconds)."""
    promote_after: int = 3
    """Consecutive healthy windows that promote the canary."""

    def __post_init__(self) -> None:
        if not 0 <= self.weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {self.weight!r}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s!r}")
        for name in ("min_requests", "promote_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 0 <= self.max_error_rate_delta <= 1:
            raise ValueError(f"max_error_rate_delta must be in [0, 1], got {self.max_error_rate_delta!r}")
        if not self.max_p99_ratio >= 1:
            raise ValueError(f"max_p99_ratio must be >= 1, got {self.max_p99_ratio!r}")
        if not self.p99_slack_s >= 0:
            raise ValueError(f"p99_slack_s must be >= 0, got {self.p99_slack_s!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CanaryConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"canary config keys must be among {sorted(known)}, got unknown {unknown}")
        return cls(**d)


INT8_SCHEMES = ("int8_ptq", "int8_qat")
"""Artifact schemes of the x86 INT8 path (PT2E + inductor), served on CPU."""


def scheme_for_device(caps=None) -> str:
    """The quantized scheme for the hardware a replica lands on: 'fp8' on CUDA sm_89+ (kernels/precision.py's
    `infer_target`), 'int8' elsewhere. `caps`: a kernels.precision.DeviceCaps (default: probe this process's
    device; tests pass a made-up one)."""
    from kernels.precision import DeviceCaps, PrecisionPolicy, QuantTarget

    if caps is None:
        caps = DeviceCaps.probe()
    elif not isinstance(caps, DeviceCaps):
        raise TypeError(f"caps must be a DeviceCaps or None, got {type(caps).__name__}")
    return "fp8" if PrecisionPolicy.from_caps(caps).infer_target == QuantTarget.FP8 else "int8"


def choose_artifact(artifacts: dict[str, str], caps=None) -> str:
    """From artifacts of one model by quantization scheme (scheme -> URI: an artifact set that holds both an FP8
    and an INT8 form, the choice made at load), the one for this hardware: FP8 on sm_89+, else INT8 (int8_ptq
    before int8_qat), else fp32 ('none'). ValueError when none of them fits (only FP8 off sm_89+)."""
    if not isinstance(artifacts, dict) or not artifacts:
        raise TypeError(f"artifacts must be a non-empty dict of scheme -> URI, got {artifacts!r}")
    want = scheme_for_device(caps)
    order = ("fp8", *INT8_SCHEMES, "none") if want == "fp8" else (*INT8_SCHEMES, "none")
    for scheme in order:
        if scheme in artifacts:
            return artifacts[scheme]
    raise ValueError(f"artifacts must hold a scheme this hardware runs ({list(order)}), got {sorted(artifacts)}")


def served_artifact(uri: str, caps=None) -> str:
    """The artifact a replica loads for `uri` (what ModelUserConfig.artifact names): `uri` itself when it is
    one artifact; for a serving set (models.artifact.read_serving_set: the forms the sweep measured) the form for
    this replica's hardware (`choose_artifact`; `caps` as in `scheme_for_device`), logged, and a log line too
    when this hardware would run FP8 but the set has no FP8 form (the INT8 form is served instead)."""
    import logging

    from models.artifact import read_serving_set

    served = read_serving_set(uri)
    if served is None:
        return uri
    from kernels.precision import DeviceCaps

    caps = DeviceCaps.probe() if caps is None else caps  # probed once, for the choice and the log line
    forms = served["forms"]
    artifact = choose_artifact({scheme: form["artifact"] for scheme, form in forms.items()}, caps)
    scheme = next(s for s, form in forms.items() if form["artifact"] == artifact)
    log = logging.getLogger("ray.serve")
    if scheme_for_device(caps) == "fp8" and scheme != "fp8":
        log.warning("serving set %s has no FP8 form measured on a GPU: this FP8-capable replica serves %s", uri, scheme)
    log.info("serving set %s: %s form (measured %.3g ms at the sweep's batch, on %s) from %s", uri, scheme,
             forms[scheme]["latency_ms"], forms[scheme].get("measured_on", "?"), artifact)  # fmt: skip
    return artifact
