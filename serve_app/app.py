"""The Serve application: a model deployment with adaptive batching behind JSON and Open Inference Protocol routes.

`build_app(args)` is the application builder that `serve run serve_app.app:build_app artifact=...` and
`serve deploy serve_app/serve_config.yaml` import. Without a canary the app is one deployment, `Model`, that is
also the HTTP ingress (one hop: the proxy's ~3 ms per request is the dominant cost on CPU, see shared/ENV.md);
with a canary (`args["canary"]`) a `Router` ingress splits traffic between two such deployments, `Model` (stable)
and `Canary` (serve_app/router.py).

Routes (JSON in, JSON out; an error is `{"error": message}` with a 4xx/5xx status):
    POST /predict                      {"instances": [x, ...]} -> {"classes", "probabilities", "model", "version"}
    GET  /v2                           server metadata
    GET  /v2/health/live, /v2/health/ready
    GET  /v2/models/{name}             model metadata (inputs, outputs, versions)
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer       OIP v2 tensors: inputs[].name/shape/datatype/data -> outputs[]
An instance `x` is one image: nested (C, H, W), or (H, W) when C == 1, or flat C*H*W numbers.

Per request: parse and validate (4xx on any bad input, nothing unpickled, body size bounded), admission control
(503 + Retry-After when the predicted latency breaks the SLO or the queue is full), then one `@serve.batch` call.
The batch handler runs the model synchronously (holding the replica's loop keeps batches full; awaiting it in a
thread makes Ray close batches of ~1), and every `BatchingConfig.window_s` the controller's settings are pushed
into the batch wrapper's runtime setters.

Hot update: the deployment's `user_config` ({"artifact", "version", "controller", "batching"}) goes through
`reconfigure`, which Serve calls in place, without restarting the replica, when a config with the same code
version (same import path, args, runtime env) is applied through the declarative path (`serve deploy`, or
`serve_app.deploy.hot_update`). The new model is loaded and verified first, then swapped between batches.
"""

# No `from __future__ import annotations` here: Serve rebuilds the ingress routes' signatures outside this
# module, where FastAPI could not resolve the string annotation "Request".

import asyncio
import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.requests import ClientDisconnect

from serve_app.batching import (
    AIMD,
    AdmissionControl,
    Bandit,
    BatchingConfig,
    BatchSettings,
    Controller,
    SLOModel,
    Static,
    Verdict,
    WindowRecorder,
    load_bandit_policy,
)
from serve_app.metrics import ServeMetrics

logger = logging.getLogger("ray.serve")

CONTROLLERS: dict[str, type[Controller]] = {"static": Static, "aimd": AIMD, "slo_model": SLOModel, "bandit": Bandit}
"""Names a user_config may give for `controller` (plus "unbatched": no @serve.batch at all)."""
UNBATCHED = "unbatched"
# JSON numbers only: OIP datatypes this server accepts, and which numpy kinds each admits ('b' never).
_OIP_DATATYPES = {
    "FP32": "iuf",
    "FP64": "iuf",
    "FP16": "iuf",
    "UINT8": "iu",
    "INT8": "iu",
    "INT16": "iu",
    "INT32": "iu",
    "INT64": "iu",
}


# ------------------------------------------------------------------------------------------------- config


@dataclass(kw_only=True, slots=True)
class ModelUserConfig:
    """What a running Model replica can change in place (its Serve `user_config`)."""

    artifact: str
    """Artifact directory (models/artifact.py) on a filesystem every replica can read."""
    version: str | None = None
    """Version reported to clients and in the model_version metric (default: the weights' sha256[:12])."""
    controller: str = "slo_model"
    """Batching controller: static, aimd, slo_model (default), bandit, or unbatched."""
    batching: dict[str, Any] = field(default_factory=dict)
    """BatchingConfig fields (serve_app/batching.py); unknown keys are an error."""
    admission: bool = True
    """Admission control (503 + Retry-After when the SLO cannot be met); False serves like plain `@serve.batch`
    (baselines in bench/serving.py)."""
    bandit_policy: str | None = None
    """With controller "bandit": a policy saved by `tandem pretrain-bandit` (Bandit.save, JSON) that the
    replica's bandit starts from instead of empty tables; it keeps learning online. Its SLO must be this
    config's (its rewards counted misses against it)."""
    update_grace_s: float = 2.0
    """Seconds after this config is applied during which admission control refuses nothing (Serve's
    max_ongoing_requests still bounds the replica). While Serve reconfigures a replica it routes nothing to it,
    so the requests that arrived meanwhile reach it at once; refusing that backlog (max_queue_len, a predicted
    latency over the SLO) would turn a planned update into errors."""

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
        if self.version is not None and not isinstance(self.version, str):
            raise ValueError(f"version must be a string or null, got {self.version!r}")
        if self.controller != UNBATCHED and self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {[*CONTROLLERS, UNBATCHED]}, got {self.controller!r}")
        BatchingConfig.from_dict(self.batching)  # validate now, not in the replica

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelUserConfig":
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
    """Replicas of each model deployment (ignored with autoscaling)."""
    autoscaling: dict[str, Any] | None = None
    """Serve autoscaling_config for the model deployments (min_replicas, max_replicas, ...)."""
    max_body_bytes: int = 1 << 20
    """Requests with a larger body get 413."""
    max_instances: int = 64
    """Images per request above this get 422."""
    num_cpus: float = 1.0
    """Logical CPUs per model replica."""
    max_queued_requests: int | None = None
    """Serve's caller-side bound (proxy, handles): requests waiting for a replica beyond this many are answered 503
    (with Retry-After) by the proxy itself, before any replica sees them. None: unbounded (Serve's default)."""
    torch_threads: int = 1
    """torch intra-op threads per replica (small CNNs on small batches: 1 is fastest and leaves cores to the
    proxy)."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "max_body_bytes", "max_instances", "torch_threads"):
            v = getattr(self, name)
            if isinstance(v, str) and v.isdigit():  # `serve run ... key=value` passes strings
                v = int(v)
                setattr(self, name, v)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.max_queued_requests, str) and self.max_queued_requests.isdigit():
            self.max_queued_requests = int(self.max_queued_requests)
        q = self.max_queued_requests
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 1):
            raise ValueError(f"max_queued_requests must be null or an int >= 1, got {q!r}")
        self.num_cpus = float(self.num_cpus)
        if not self.num_cpus >= 0:
            raise ValueError(f"num_cpus must be >= 0, got {self.num_cpus!r}")
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
    def from_dict(cls, d: dict[str, Any]) -> "AppConfig":
        return cls(**_known(cls, d, "app args"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def model_user_config(self) -> "ModelUserConfig":
        return ModelUserConfig(
            artifact=self.artifact,
            version=self.version,
            controller=self.controller,
            batching=dict(self.batching),
            bandit_policy=self.bandit_policy,
        )

    def canary_user_config(self) -> "ModelUserConfig":
        assert self.canary is not None
        return ModelUserConfig(
            artifact=self.canary["artifact"],
            version=self.canary.get("version"),
            controller=self.controller,
            batching=dict(self.batching),
            bandit_policy=self.bandit_policy,
        )

    def canary_policy(self) -> dict[str, Any]:
        """The canary dict without the model keys: serve_app.router.CanaryConfig fields (validated)."""
        from serve_app.router import CanaryConfig

        assert self.canary is not None
        policy = {k: v for k, v in self.canary.items() if k not in ("artifact", "version")}
        CanaryConfig.from_dict(policy)
        return policy

    def max_ongoing_requests(self) -> int:
        """A replica accepts the largest batch plus the bounded queue, so requests queue where admission
        control sees them (not in the proxy's router, which backs off and can collapse, shared/ENV.md)."""
        b = self.model_user_config().batching_config()
        return b.max_batch_size + (b.max_queue_len if b.max_queue_len is not None else 256)


def _known(cls: type, d: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a dict, got {type(d).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{what} keys must be among {sorted(known)}, got unknown {unknown}")
    return d


# ---------------------------------------------------------------------------------------- request parsing


class BadRequest(Exception):
    """A client error: answered with `status` and the message, never logged as a server fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Reply:
    """A route's answer, plain data so that it crosses a handle (Router -> Model) as well as HTTP."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status, {"error": message}, headers or {})

    def response(self) -> Response:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def parse_json(body: bytes, max_bytes: int) -> dict[str, Any]:
    """The request's JSON object (413 over `max_bytes`, 400 when not a JSON object)."""
    if len(body) > max_bytes:
        raise BadRequest(413, f"request body must be at most {max_bytes} bytes, got {len(body)}")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(400, f"request body must be JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest(400, f"request body must be a JSON object, got {type(obj).__name__}")
    return obj


def _numbers(data: Any, what: str, kinds: str = "iuf") -> np.ndarray:
    """A numeric array from JSON lists (422 for ragged lists, strings, bools, objects, NaN or inf)."""
    try:
        arr = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise BadRequest(422, f"{what} must be a rectangular array of numbers: {e}") from None
    if arr.dtype.kind not in kinds or arr.size == 0:
        kind = {"i": "int", "u": "int", "f": "float"}
        want = "/".join(sorted({kind[k] for k in kinds}))
        raise BadRequest(422, f"{what} must be a non-empty array of {want} numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise BadRequest(422, f"{what} must be finite numbers (no NaN or inf, none beyond float32's range)")
    return arr


def instances_to_array(instances: Any, input_shape: tuple[int, int, int], max_instances: int) -> np.ndarray:
    """(N, C, H, W) float32 from /predict's `instances`: each one (C, H, W), (H, W) when C == 1, or flat."""
    if not isinstance(instances, list) or not instances:
        raise BadRequest(422, f"instances must be a non-empty list, got {type(instances).__name__}")
    if len(instances) > max_instances:
        raise BadRequest(422, f"instances must hold at most {max_instances} images, got {len(instances)}")
    arr = _numbers(instances, "instances")
    c, h, w = input_shape
    each = tuple(arr.shape[1:])
    if each not in (input_shape, (c * h * w,)) and not (c == 1 and each == (h, w)):
        allowed = [list(input_shape), [c * h * w]] + ([[h, w]] if c == 1 else [])
        raise BadRequest(422, f"each instance must have shape one of {allowed}, got {list(each)}")
    return arr.reshape(len(instances), c, h, w)


def oip_to_array(req: dict[str, Any], input_shape: tuple[int, int, int], max_instances: int) -> np.ndarray:
    """(N, C, H, W) float32 from an OIP v2 infer request with one input of shape [N, C, H, W] or [N, C*H*W]."""
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(400, "inputs must be a list of exactly one tensor object {name, shape, datatype, data}")
    t = inputs[0]
    missing = [k for k in ("name", "shape", "datatype", "data") if k not in t]
    if missing:
        raise BadRequest(400, f"inputs[0] must have name, shape, datatype and data; missing {missing}")
    dtype = t["datatype"]
    if dtype not in _OIP_DATATYPES:
        raise BadRequest(422, f"inputs[0].datatype must be one of {sorted(_OIP_DATATYPES)}, got {dtype!r}")
    shape = t["shape"]
    if not isinstance(shape, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape):
        raise BadRequest(422, f"inputs[0].shape must be a list of ints, got {shape!r}")
    c, h, w = input_shape
    if len(shape) not in (2, 4) or tuple(shape[1:]) not in (input_shape, (c * h * w,)):
        raise BadRequest(422, f"inputs[0].shape must be [N, {c}, {h}, {w}] or [N, {c * h * w}], got {shape}")
    n = shape[0]
    if not 1 <= n <= max_instances:
        raise BadRequest(422, f"inputs[0].shape[0] (batch) must be in [1, {max_instances}], got {n}")
    arr = _numbers(t["data"], "inputs[0].data", _OIP_DATATYPES[dtype])
    if arr.size != math.prod(shape):
        raise BadRequest(422, f"inputs[0].data must hold prod(shape) = {math.prod(shape)} numbers, got {arr.size}")
    return arr.reshape(n, c, h, w)


# --------------------------------------------------------------------------------------------- the replica


class ModelFault(Exception):
    """The model's output is unusable (NaN/inf): a server fault, answered 500."""


class Overloaded(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


@dataclass(slots=True)
class _Queued:
    """A request's images while it waits for a batch; `started` once Ray hands it to the batch handler."""

    x: np.ndarray
    started: bool = False


class ModelServer:
    """One replica: the model, its batching controller, admission control, metrics, and the routes' logic.

    `respond(route, body, name)` is the whole request path, callable through a handle (the canary Router does)
    as well as from this class's own HTTP routes.
    """

    def __init__(self, app: dict[str, Any], deployment: str = "Model") -> None:
        import torch

        self.cfg = AppConfig.from_dict(app)
        self.deployment = deployment
        torch.set_num_threads(self.cfg.torch_threads)
        self.metrics = ServeMetrics(deployment, self.cfg.name)
        self.model = None
        self.manifest: dict[str, Any] = {}
        self.version = ""
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.user: ModelUserConfig | None = None
        self.ctl: Controller = Static()
        self.gate = AdmissionControl(self.ctl.config)
        self.rec = WindowRecorder(time.monotonic())
        self._control_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._lags: deque[float] = deque(maxlen=20)
        self._grace_until = 0.0
        # The controller learns t(b) from the batch's CPU time when the forward runs in this thread alone (one
        # torch thread, a CPU model): on a shared machine wall time includes the replica being preempted, and
        # outliers of 10-30x (measured under load here) drove the fit's p99 noise up, the cap to 1 and admission
        # into refusing at light load. Queueing and preemption still show in the latencies the SLOModel watches.
        self._clock = time.thread_time if self.cfg.torch_threads == 1 else time.perf_counter

    # -- hot update
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Loads and verifies the artifact named by `user_config`, warms it up, then swaps model and controller
        in one step; requests in flight finish on whichever model their batch started with."""
        from models.artifact import load_artifact

        user = ModelUserConfig.from_dict(user_config)
        if self.user is not None and asdict(user) == asdict(self.user):
            return
        model, manifest, version = self.model, self.manifest, self.version
        new_model = self.user is None or (user.artifact, user.version) != (self.user.artifact, self.user.version)
        if new_model:
            model, manifest = load_artifact(user.artifact)
            version = user.version or manifest["tensors"]["sha256"][:12]
        ctl = user.build_controller()
        self._warm_up(model, tuple(manifest["input_shape"]), ctl)
        self.model, self.manifest, self.version = model, manifest, version
        self.input_shape = tuple(manifest["input_shape"])
        self.ctl, self.gate, self.user = ctl, AdmissionControl(ctl.config), user
        self._grace_until = time.monotonic() + user.update_grace_s
        self._apply(ctl.settings)
        if new_model:
            self.metrics.model_version(version)
            logger.info("%s: serving %s version %s", self.deployment, user.artifact, version)

    def _warm_up(self, model, input_shape: tuple[int, ...], ctl: Controller, rounds: int = 3) -> None:
        """Runs the model on every power-of-two batch size up to the cap, `rounds` times, and seeds the new
        controller's service-time fit with all but the first round: the first calls after a load are slow
        (allocation, lazy init), and admission control predicting from them alone would refuse everything."""
        import torch

        cap = ctl.config.max_batch_size
        sizes = sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)})
        x = torch.rand(cap, *input_shape, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for r in range(rounds):
                for b in sizes:
                    t0 = self._clock()
                    model(x[:b])
                    if r:
                        ctl.observe_batch(b, self._clock() - t0)

    def _apply(self, st: BatchSettings) -> None:
        self._batched.set_max_batch_size(st.max_batch_size)
        self._batched.set_batch_wait_timeout_s(st.batch_wait_timeout_s)

    # -- control loop
    def _ensure_control_loop(self) -> None:
        if self._control_task is None or self._control_task.done():
            loop = asyncio.get_running_loop()
            self._control_task = loop.create_task(self._control_loop())
            self._lag_task = loop.create_task(self._lag_loop())

    async def _lag_loop(self, period_s: float = 0.01) -> None:
        """Samples how late this event loop wakes a sleeper. Requests that reach the replica wait on this loop
        before `infer` sees them, a wait invisible to the queue count and to the batch model. Adding it to the
        prediction raised SLO attainment at 3x overload on the handle path from 0.32 to 0.80 (one run each);
        at 2x it measured 0-7 ms, and most of the latency clients saw lay outside the replica (driver side)."""
        while True:
            t = time.monotonic()
            await asyncio.sleep(period_s)
            self._lags.append(max(0.0, time.monotonic() - t - period_s))

    def standing_lag(self) -> float:
        """The loop's lag that persisted over the last ~0.2 s (the minimum of the last samples, as CoDel takes
        the minimum sojourn: a blocking forward pass delays a few samples, a saturated loop delays them all);
        0 until enough samples."""
        return min(self._lags) if len(self._lags) == self._lags.maxlen else 0.0

    async def _control_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ctl.config.window_s)
            stats = self.rec.close(time.monotonic())
            st = self.ctl.update(stats)
            self._apply(st)
            self.metrics.window(stats, st)

    # -- inference
    async def infer(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """(probabilities (N, K), version) for images x (N, C, H, W); raises Overloaded when not admitted and
        ModelFault when the model's output is not finite."""
        self._ensure_control_loop()
        t0 = time.monotonic()
        verdict = None
        if self.user is not None and self.user.controller == UNBATCHED:
            probs, version = self._forward([x])[0]
        else:
            queued, lag = self.rec.queue_len, self.standing_lag()
            verdict = self.gate.check(queued, self.ctl, lag)
            self.rec.arrival()
            # Liveness: with nothing queued a rejection protects no one, and a replica refusing everything would
            # never observe another batch to correct the prediction that made it refuse - unless the event loop
            # itself is far behind (measured all the time, admitted requests or not).
            saturated = lag > self.ctl.config.slo_s / 2
            in_grace = time.monotonic() < self._grace_until  # just updated (ModelUserConfig.update_grace_s)
            if not verdict.admitted and (queued > 0 or saturated) and self.user.admission and not in_grace:
                self.rec.rejected()
                raise Overloaded(verdict)
            item = _Queued(x)
            try:
                probs, version = await self._batched(item)
            except asyncio.CancelledError:  # the client gave up (timeout, disconnect)
                if not item.started:
                    # Ray drops cancelled requests from the next batch, so batch_start never counts this one:
                    # take it out of the queue here, or queue_len leaks upwards and admission refuses on a
                    # phantom backlog. (Counted as a rejection: it left unserved, an SLO miss either way.)
                    self.rec.rejected()
                raise
        latency = time.monotonic() - t0
        self.rec.done(latency)
        if verdict is not None and verdict.model_latency_s is not None:
            self.gate.calibration.observe(verdict.model_latency_s, latency)
        if not np.isfinite(probs).all():
            raise ModelFault(f"model version {version} produced non-finite probabilities")
        return probs, version

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[_Queued]) -> list[tuple[np.ndarray, str]]:
        n = len(items)
        for it in items:
            it.started = True
        xs = [it.x for it in items]
        self.rec.batch_start(n)
        t0, c0 = time.perf_counter(), self._clock()
        out = self._forward(xs)
        s, work = time.perf_counter() - t0, self._clock() - c0
        self.rec.batch_end(n, work)
        self.ctl.observe_batch(n, work)
        self.metrics.batch(n, s)
        return out

    def _forward(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Runs the model on the requests' images concatenated; synchronous on purpose (module docstring)."""
        import torch

        model, version = self.model, self.version  # one model per batch, even across a hot update
        sizes = [len(x) for x in xs]
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.concatenate(xs)))  # (sum N, K)
            probs = torch.softmax(logits.float(), dim=1).numpy()
        return [(p, version) for p in np.split(probs, np.cumsum(sizes)[:-1])]

    # -- routes' logic (plain data in and out)
    async def respond(self, route: str, body: bytes = b"", name: str | None = None) -> "Reply":
        t0 = time.monotonic()
        try:
            reply = await self._respond(route, body, name)
        except BadRequest as e:
            reply = Reply.error(e.status, str(e))
        except Overloaded as e:
            v = e.verdict
            reply = Reply.error(503, f"overloaded: {v.reason}", {"Retry-After": v.retry_after_header()})
        except ModelFault as e:
            reply = Reply.error(500, str(e))
        except Exception as e:  # a fault in the model or this code: 500, and the replica keeps serving
            logger.exception("%s: %s failed", self.deployment, route)
            reply = Reply.error(500, f"internal error: {type(e).__name__}: {e}")
        self.metrics.request(route, reply.status, time.monotonic() - t0)
        return reply

    async def _respond(self, route: str, body: bytes, name: str | None) -> "Reply":
        if route == "live":
            return Reply(200, {"live": True})
        if route == "ready":
            return Reply(200 if self.model is not None else 503, {"ready": self.model is not None})
        if route == "server_metadata":
            return Reply(200, {"name": "tandem", "version": "1", "extensions": []})
        if route == "predict":
            x = instances_to_array(
                parse_json(body, self.cfg.max_body_bytes).get("instances"), self.input_shape, self.cfg.max_instances
            )
            probs, version = await self.infer(x)
            return Reply(
                200,
                {
                    "classes": probs.argmax(1).tolist(),
                    "probabilities": probs.tolist(),
                    "model": self.cfg.name,
                    "version": version,
                },
            )
        if name != self.cfg.name:
            raise BadRequest(404, f"model must be {self.cfg.name!r}, got {name!r}")
        if route == "model_ready":
            return Reply(200 if self.model is not None else 503, {"name": name, "ready": self.model is not None})
        if route == "model_metadata":
            return Reply(200, self.metadata())
        if route == "infer":
            req = parse_json(body, self.cfg.max_body_bytes)
            x = oip_to_array(req, self.input_shape, self.cfg.max_instances)
            probs, version = await self.infer(x)
            n, k = probs.shape
            out = {
                "model_name": name,
                "model_version": version,
                "outputs": [
                    {"name": "probabilities", "shape": [n, k], "datatype": "FP32", "data": probs.ravel().tolist()},
                    {"name": "class", "shape": [n], "datatype": "INT64", "data": probs.argmax(1).tolist()},
                ],
            }
            if isinstance(req.get("id"), str):
                out["id"] = req["id"]
            return Reply(200, out)
        raise BadRequest(404, f"no route {route!r}")

    def metadata(self) -> dict[str, Any]:
        c, h, w = self.input_shape
        k = self.manifest.get("num_classes")
        replica = serve.get_replica_context().replica_id.unique_id
        return {
            "name": self.cfg.name,
            "versions": [self.version],
            "platform": "pytorch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                {"name": "class", "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {
                "replica": replica,
                "deployment": self.deployment,
                "class_names": self.manifest.get("class_names"),
                "quantization": self.manifest.get("quantization", {}).get("scheme"),
                "test_accuracy": self.manifest.get("accuracy", {}).get("test_accuracy"),
                "controller": self.user.controller if self.user else None,
                "user_config": asdict(self.user) if self.user else None,
                "batch_settings": asdict(self.ctl.settings),
                "slo_s": self.ctl.config.slo_s,
                "service_time_fit": {
                    "a_s": self.ctl.fit.a,
                    "c_s": self.ctl.fit.c,
                    "noise_quantile": self.ctl.fit.noise_quantile(self.ctl.config.quantile),
                },
                "admission_calibration": {
                    "alpha": self.gate.calibration.alpha,
                    "beta_s": self.gate.calibration.beta,
                    "samples": self.gate.calibration.samples,
                    "standing_loop_lag_s": self.standing_lag(),
                },
            },
        }


# -------------------------------------------------------------------------------------------- HTTP routes


def http_routes(api: FastAPI) -> type:
    """A mixin class whose methods are the HTTP routes on `api`, each a thin shim over
    `await self.respond(route, body, name)`: the Model ingress answers itself, the canary Router forwards.
    (`@serve.ingress` binds routes whose endpoint's qualname lies in the class's MRO, hence a class.)"""

    class Routes:
        async def _call(self, route: str, request: Request | None = None, name: str | None = None) -> Response:
            body = b""
            if request is not None:
                limit = self.cfg.max_body_bytes
                declared = request.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:  # refuse before reading it
                    return Reply.error(413, f"request body must be at most {limit} bytes, got {declared}").response()
                try:
                    body = await request.body()
                except ClientDisconnect:  # the client gave up (its timeout) before sending the whole body
                    return Reply.error(499, "client disconnected").response()
            reply = await self.respond(route, body, name)
            return reply.response()

        @api.post("/predict")
        async def predict(self, request: Request) -> Response:
            return await self._call("predict", request)

        @api.post("/v2/models/{name}/infer")
        async def infer_route(self, name: str, request: Request) -> Response:
            return await self._call("infer", request, name)

        @api.get("/v2/health/live")
        async def live(self) -> Response:
            return await self._call("live")

        @api.get("/v2/health/ready")
        async def ready(self) -> Response:
            return await self._call("ready")

        @api.get("/v2")
        async def server_metadata(self) -> Response:
            return await self._call("server_metadata")

        @api.get("/v2/models/{name}")
        async def model_metadata(self, name: str) -> Response:
            return await self._call("model_metadata", None, name)

        @api.get("/v2/models/{name}/ready")
        async def model_ready(self, name: str) -> Response:
            return await self._call("model_ready", None, name)

    return Routes


model_api = FastAPI(title="tandem model server")


class _ModelIngress(ModelServer, http_routes(model_api)):
    pass


Model = serve.deployment(name="Model")(serve.ingress(model_api)(_ModelIngress))
# Behind the canary Router: the same replica without HTTP routes (Serve allows one FastAPI ingress per app).
Backend = serve.deployment(name="Backend")(ModelServer)


# ----------------------------------------------------------------------------------------------- builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run serve_app.app:build_app artifact=DIR [...]` (fields of `AppConfig`)."""
    cfg = AppConfig.from_dict(dict(args))
    app_dict = cfg.to_dict()
    model_opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests(),
        "ray_actor_options": {"num_cpus": cfg.num_cpus},
        "health_check_period_s": 2,
    }
    if cfg.max_queued_requests is not None:
        model_opts["max_queued_requests"] = cfg.max_queued_requests
        model_opts["backpressure_config"] = {"status_code": 503, "retry_after_s": 1}
    if cfg.autoscaling is not None:
        model_opts["autoscaling_config"] = cfg.autoscaling
    else:
        model_opts["num_replicas"] = cfg.num_replicas
    if cfg.canary is None:
        return Model.options(name="Model", user_config=asdict(cfg.model_user_config()), **model_opts).bind(
            app_dict, "Model"
        )
    from serve_app.router import Router

    stable = Backend.options(name="Model", user_config=asdict(cfg.model_user_config()), **model_opts)
    canary = Backend.options(name="Canary", user_config=asdict(cfg.canary_user_config()), **model_opts)
    return Router.options(
        max_ongoing_requests=2 * cfg.max_ongoing_requests() * max(1, cfg.num_replicas),
        user_config=cfg.canary_policy(),
    ).bind(app_dict, stable.bind(app_dict, "Model"), canary.bind(app_dict, "Canary"))
