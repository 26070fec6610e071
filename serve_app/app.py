"""The Serve application: a model deployment with adaptive batching behind JSON and Open Inference Protocol routes.

`build_app(args)` is the application builder that `serve run serve_app.app:build_app artifact=...` and
`serve deploy serve_app/serve_config.yaml` import. Without a canary the app is one deployment, `Model`, that is
also the HTTP ingress (one hop; with tandem's HAProxy ingress HAProxy sends HTTP straight to it, see
tandem/local_ray.py);
with a canary (`args["canary"]`) a `Router` ingress splits traffic between two such deployments, `Model` (stable)
and `Canary` (serve_app/router.py).

Routes (an error is `{"error": message}` with a 4xx/5xx status, on every route, FastAPI's own 404/405 included;
wire formats and limits in serve_app/protocol.py):
    POST /predict                      {"instances": [x, ...]} -> {"classes", "labels"?, "probabilities", ...}
    GET  /v2                           server metadata (extensions: binary_tensor_data, statistics)
    GET  /v2/health/live, /v2/health/ready
    POST /v2/repository/index          [{"name", "version", "state"}]
    GET  /v2/models/{name}[/versions/{v}]             model metadata (inputs, outputs, versions)
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config      model configuration (Triton's JSON form)
    GET  /v2/models/{name}[/versions/{v}]/stats, /v2/models/stats   statistics extension
    POST /v2/models/{name}[/versions/{v}]/infer       OIP v2 tensors, JSON or the binary tensor data extension
An instance `x` is one image: nested (C, H, W), or (H, W) when C == 1, or flat C*H*W numbers. `labels` are the
artifact's class names when its manifest has them.

Per request: parse and validate (4xx on any bad input, nothing unpickled, the body bounded while it streams in,
gzip/deflate, Content-Type checked), admission control
(503 + Retry-After when the predicted latency breaks the SLO or the queue is full), then one `@serve.batch` call.
The batch handler runs the model synchronously (holding the replica's loop keeps batches full; awaiting it in a
thread makes Ray close batches of ~1), and every `BatchingConfig.window_s` the controller's settings are pushed
into the batch wrapper's runtime setters.

Hot update: the deployment's `user_config` ({"artifact", "version", "controller", "batching"}) goes through
`reconfigure`, which Serve calls in place, without restarting the replica, when a config with the same code
version (same import path, args, runtime env) is applied through the declarative path (`serve deploy`, or
`serve_app.deploy.hot_update`). The new model is loaded, verified and warmed up in a worker thread while the
replica goes on serving with the old one, then swapped between batches: nothing queues up behind an update.
"""

# No `from __future__ import annotations` here: Serve rebuilds the ingress routes' signatures outside this
# module, where FastAPI could not resolve the string annotation "Request".

import asyncio
import json
import logging
import os
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
from serve_app.protocol import (
    ERROR_RESPONSES,
    HEADER_LENGTH,
    INFER_BODY,
    INPUT_NAME,
    PREDICT_BODY,
    BadRequest,
    check_content_type,
    decode_body,
    encode_infer,
    instances_to_array,
    parse_infer,
    parse_json,
    read_body,
)

logger = logging.getLogger("ray.serve")

CONTROLLERS: dict[str, type[Controller]] = {"static": Static, "aimd": AIMD, "slo_model": SLOModel, "bandit": Bandit}
"""Names a user_config may give for `controller` (plus "unbatched": no @serve.batch at all)."""
UNBATCHED = "unbatched"


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


@dataclass(frozen=True, slots=True)
class Reply:
    """A route's answer, plain data so that it crosses a handle (Router -> Model) as well as HTTP: a JSON `body`,
    or `raw` bytes of `media_type` (an OIP infer answer with binary tensors)."""

    status: int
    body: dict[str, Any] | list[Any]
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    media_type: str = "application/json"

    @classmethod
    def error(cls, status: int, message: str, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status, {"error": message}, headers or {})

    def response(self) -> Response:
        if self.raw is not None:
            return Response(self.raw, status_code=self.status, headers=self.headers, media_type=self.media_type)
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


# --------------------------------------------------------------------------------------------- the replica


@dataclass(frozen=True, slots=True)
class Call:
    """One request to a route's logic, plain data so that it crosses a handle (Router -> Model)."""

    route: str
    body: bytes = b""
    name: str | None = None
    """Model name from the path (/v2/models/{name}/...)."""
    version: str | None = None
    """Model version from the path (/v2/models/{name}/versions/{version}/...); None: the current one."""
    header_length: str | None = None
    """Inference-Header-Content-Length (binary tensor data extension)."""


@dataclass(slots=True)
class InferStats:
    """The OIP statistics extension's counters for the one model (per replica)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0

    def record(self, status: int, elapsed_s: float) -> None:
        ns = round(elapsed_s * 1e9)
        if status == 200:
            self.success, self.success_ns = self.success + 1, self.success_ns + ns
        else:
            self.fail, self.fail_ns = self.fail + 1, self.fail_ns + ns
        self.last_inference_ms = round(time.time() * 1e3)

    def to_dict(self, name: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success,
            "execution_count": self.success,
            "inference_stats": {
                "success": {"count": self.success, "ns": self.success_ns},
                "fail": {"count": self.fail, "ns": self.fail_ns},
                "queue": zero,
                "compute_input": zero,
                "compute_infer": zero,
                "compute_output": zero,
            },
            "batch_stats": [],
        }


class ModelFault(Exception):
    """The model's output is not finite. Answered 422 when the model is sound on ordinary inputs (its warm-up on
    [0, 1) images was finite), so these inputs caused it (all 3e38, finite in float32, overflow a CNN); 500 when
    the model itself is broken (non-finite on the warm-up too, e.g. a bad quantization)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
        self.stats = InferStats()
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
        self._sound = True
        # The controller learns t(b) from the batch's CPU time when the forward runs in this thread alone (one
        # torch thread, a CPU model): on a shared machine wall time includes the replica being preempted, and
        # outliers of 10-30x (measured under load here) drove the fit's p99 noise up, the cap to 1 and admission
        # into refusing at light load. Queueing and preemption still show in the latencies the SLOModel watches.
        self._clock = time.thread_time if self.cfg.torch_threads == 1 else time.perf_counter

    # -- hot update
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Loads and verifies the artifact named by `user_config` and warms it up in a worker thread while this
        replica goes on serving with the current model, then swaps model and controller in one step on the event
        loop; requests in flight finish on whichever model their batch started with.

        Why a thread: a synchronous reconfigure held the replica's event loop for the whole load and warm-up
        (~0.1-0.5 s), and the requests of that window queued at the replica or the proxy, where bounds
        (max_queued_requests, admission's max_queue_len) refused some of them (14 of 945 once in CI). Serving on
        through the update needs no grace period or lifted bound to lose nothing."""
        user = ModelUserConfig.from_dict(user_config)
        if self.user is not None and asdict(user) == asdict(self.user):
            return
        new_model = self.user is None or (user.artifact, user.version) != (self.user.artifact, self.user.version)
        model, manifest, version, ctl, sound = await asyncio.to_thread(self._prepare, user, new_model)
        self.model, self.manifest, self.version, self._sound = model, manifest, version, sound
        self.input_shape = tuple(manifest["input_shape"])
        self.ctl, self.gate, self.user = ctl, AdmissionControl(ctl.config), user
        self._grace_until = time.monotonic() + user.update_grace_s
        self._apply(ctl.settings)
        self._ensure_control_loop()  # from the start, so the gauges are exported before the first request
        if new_model:
            self.metrics.model_version(version)
            logger.info("%s: serving %s version %s", self.deployment, user.artifact, version)

    def _prepare(self, user: "ModelUserConfig", new_model: bool) -> tuple[Any, dict[str, Any], str, Controller, bool]:
        """(model, manifest, version, warmed-up controller, finite on the warm-up) for `user`; runs off the event
        loop."""
        from models.artifact import load_artifact

        model, manifest, version = self.model, self.manifest, self.version
        if new_model:
            model, manifest = load_artifact(user.artifact)
            version = user.version or manifest["tensors"]["sha256"][:12]
        ctl = user.build_controller()
        sound = self._warm_up(model, tuple(manifest["input_shape"]), ctl)
        return model, manifest, version, ctl, sound

    def _warm_up(self, model, input_shape: tuple[int, ...], ctl: Controller, rounds: int = 3) -> bool:
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
                    out = model(x[:b])
                    if r:
                        ctl.observe_batch(b, self._clock() - t0)
        return bool(torch.isfinite(out).all())

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
            if self._sound:
                raise ModelFault(
                    f"inputs must keep model version {version}'s outputs finite, got non-finite probabilities"
                    " (values far outside the training range?)",
                    422,
                )
            raise ModelFault(f"model version {version} produced non-finite probabilities", 500)
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
    async def respond(self, call: "Call") -> "Reply":
        t0 = time.monotonic()
        try:
            reply = await self._respond(call)
        except BadRequest as e:
            reply = Reply.error(e.status, str(e))
        except Overloaded as e:
            v = e.verdict
            reply = Reply.error(503, f"overloaded: {v.reason}", {"Retry-After": v.retry_after_header()})
        except ModelFault as e:
            reply = Reply.error(e.status, str(e))
        except Exception as e:  # a fault in the model or this code: 500, and the replica keeps serving
            logger.exception("%s: %s failed", self.deployment, call.route)
            reply = Reply.error(500, f"internal error: {type(e).__name__}: {e}")
        elapsed = time.monotonic() - t0
        self.metrics.request(call.route, reply.status, elapsed)
        if call.route in ("predict", "infer"):
            self.stats.record(reply.status, elapsed)
        return reply

    def _check_model(self, call: "Call") -> None:
        if call.name != self.cfg.name:
            raise BadRequest(404, f"model must be {self.cfg.name!r}, got {call.name!r}")
        if call.version is not None and call.version != self.version:
            raise BadRequest(404, f"version of model {call.name!r} must be {self.version!r}, got {call.version!r}")

    async def _respond(self, call: "Call") -> "Reply":
        route, body = call.route, call.body
        if route == "live":
            return Reply(200, {"live": True})
        if route == "ready":
            return Reply(200 if self.model is not None else 503, {"ready": self.model is not None})
        if route == "server_metadata":
            return Reply(200, {"name": "tandem", "version": "1", "extensions": ["binary_tensor_data", "statistics"]})
        if route == "repository_index":
            state = "READY" if self.model is not None else "UNAVAILABLE"
            return Reply(200, [{"name": self.cfg.name, "version": self.version, "state": state}])  # a JSON array
        if route == "predict":
            x = instances_to_array(
                parse_json(body, self.cfg.max_body_bytes).get("instances"), self.input_shape, self.cfg.max_instances
            )
            probs, version = await self.infer(x)
            classes = probs.argmax(1).tolist()
            out = {"classes": classes, "probabilities": probs.tolist(), "model": self.cfg.name, "version": version}
            names = self.manifest.get("class_names")
            if isinstance(names, list) and len(names) == probs.shape[1]:
                out["labels"] = [names[c] for c in classes]
            return Reply(200, out)
        if route == "all_stats":
            return Reply(200, {"model_stats": [self.stats.to_dict(self.cfg.name, self.version)]})
        self._check_model(call)
        if route == "model_ready":
            return Reply(200 if self.model is not None else 503, {"name": call.name, "ready": self.model is not None})
        if route == "model_metadata":
            return Reply(200, self.metadata())
        if route == "model_config":
            return Reply(200, self.model_config())
        if route == "model_stats":
            return Reply(200, {"model_stats": [self.stats.to_dict(self.cfg.name, self.version)]})
        if route == "infer":
            req = parse_infer(
                body, call.header_length, self.input_shape, self.cfg.max_instances, self.cfg.max_body_bytes
            )
            probs, version = await self.infer(req.x)
            enc = encode_infer(req, probs, self.cfg.name, version)
            if enc.media_type == "application/json":
                return Reply(200, json.loads(enc.body))
            return Reply(200, {}, enc.headers, enc.body, enc.media_type)
        raise BadRequest(404, f"no route {route!r}")

    def model_config(self) -> dict[str, Any]:
        """The model's configuration in Triton's JSON form (what tritonclient's get_model_config returns)."""
        c, h, w = self.input_shape
        return {
            "name": self.cfg.name,
            "platform": "pytorch",
            "backend": "pytorch",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": self.cfg.max_instances,
            "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [c, h, w]}],
            "output": [
                {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [self.manifest.get("num_classes", -1)]},
                {"name": "class", "data_type": "TYPE_INT64", "dims": []},
            ],
            "dynamic_batching": {
                "max_queue_delay_microseconds": round(self.ctl.config.max_wait_s * 1e6),
                "preferred_batch_size": [self.ctl.settings.max_batch_size],
            },
            "parameters": {"controller": {"string_value": self.user.controller if self.user else ""}},
        }

    def metadata(self) -> dict[str, Any]:
        c, h, w = self.input_shape
        k = self.manifest.get("num_classes")
        replica = serve.get_replica_context().replica_id.unique_id
        return {
            "name": self.cfg.name,
            "versions": [self.version],
            "platform": "pytorch",
            "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
                {"name": "class", "datatype": "INT64", "shape": [-1]},
            ],
            "parameters": {
                "replica": replica,
                "pid": os.getpid(),
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
    `await self.respond(Call(...))`: the Model ingress answers itself, the canary Router forwards.
    (`@serve.ingress` binds routes whose endpoint's qualname lies in the class's MRO, hence a class.)"""
    _error_format(api)
    body_route = {"responses": {200: {"description": "OK"}, **ERROR_RESPONSES}}
    get_route = {"responses": {200: {"description": "OK"}, **{k: ERROR_RESPONSES[k] for k in (404, 500, 503)}}}

    class Routes:
        async def _call(
            self,
            route: str,
            request: Request | None = None,
            name: str | None = None,
            version: str | None = None,
        ) -> Response:
            body, header_length = b"", None
            if request is not None:
                limit = self.cfg.max_body_bytes
                header_length = request.headers.get(HEADER_LENGTH) if route == "infer" else None
                try:
                    check_content_type(request.headers.get("content-type"), header_length is not None)
                    body = await read_body(request.stream(), request.headers.get("content-length"), limit)
                    body = decode_body(body, request.headers.get("content-encoding"), limit)
                except BadRequest as e:
                    return Reply.error(e.status, str(e)).response()
                except ClientDisconnect:  # the client gave up (its timeout) before sending the whole body
                    return Reply.error(499, "client disconnected").response()
            reply = await self.respond(Call(route, body, name, version, header_length))
            return reply.response()

        @api.post("/predict", openapi_extra=PREDICT_BODY, **body_route)
        async def predict(self, request: Request) -> Response:
            return await self._call("predict", request)

        @api.post("/v2/models/{name}/infer", openapi_extra=INFER_BODY, **body_route)
        async def infer_route(self, name: str, request: Request) -> Response:
            return await self._call("infer", request, name)

        @api.post("/v2/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY, **body_route)
        async def infer_version(self, name: str, version: str, request: Request) -> Response:
            return await self._call("infer", request, name, version)

        @api.get("/v2/health/live", **get_route)
        async def live(self) -> Response:
            return await self._call("live")

        @api.get("/v2/health/ready", **get_route)
        async def ready(self) -> Response:
            return await self._call("ready")

        @api.get("/v2", **get_route)
        async def server_metadata(self) -> Response:
            return await self._call("server_metadata")

        @api.post("/v2/repository/index", **get_route)
        async def repository_index(self) -> Response:
            return await self._call("repository_index")

        @api.get("/v2/models/stats", **get_route)
        async def all_stats(self) -> Response:
            return await self._call("all_stats")

        @api.get("/v2/models/{name}", **get_route)
        async def model_metadata(self, name: str) -> Response:
            return await self._call("model_metadata", None, name)

        @api.get("/v2/models/{name}/versions/{version}", **get_route)
        async def model_metadata_version(self, name: str, version: str) -> Response:
            return await self._call("model_metadata", None, name, version)

        @api.get("/v2/models/{name}/ready", **get_route)
        async def model_ready(self, name: str) -> Response:
            return await self._call("model_ready", None, name)

        @api.get("/v2/models/{name}/versions/{version}/ready", **get_route)
        async def model_ready_version(self, name: str, version: str) -> Response:
            return await self._call("model_ready", None, name, version)

        @api.get("/v2/models/{name}/config", **get_route)
        async def model_config_route(self, name: str) -> Response:
            return await self._call("model_config", None, name)

        @api.get("/v2/models/{name}/versions/{version}/config", **get_route)
        async def model_config_version(self, name: str, version: str) -> Response:
            return await self._call("model_config", None, name, version)

        @api.get("/v2/models/{name}/stats", **get_route)
        async def model_stats(self, name: str) -> Response:
            return await self._call("model_stats", None, name)

        @api.get("/v2/models/{name}/versions/{version}/stats", **get_route)
        async def model_stats_version(self, name: str, version: str) -> Response:
            return await self._call("model_stats", None, name, version)

    return Routes


def _error_format(api: FastAPI) -> None:
    """Errors FastAPI answers itself (no such route 404, wrong method 405, bad path parameters 422) in the
    protocol's `{"error": message}` format, as the routes answer theirs (FastAPI's own is `{"detail": ...}`,
    which OIP clients cannot read)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request: Request, exc: HTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return Reply.error(exc.status_code, f"{request.method} {request.url.path}: {detail}", exc.headers).response()

    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return Reply.error(422, f"{request.method} {request.url.path}: {exc.errors()}").response()

    api.add_exception_handler(HTTPException, http_error)
    api.add_exception_handler(RequestValidationError, validation_error)


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
