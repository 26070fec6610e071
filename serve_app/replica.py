"""One model replica (`ModelServer`): the model, its batching policy (serve_app.batching.BatchingPolicy: recorder,
controller, admission control and calibration, the object serve_app/simulator.py drives too), metrics, and the
routes' logic (`respond(Call) -> Reply`), callable through a handle as well as from the HTTP routes. Hot updates
come in through `reconfigure` (the deployment's user_config), loaded off the event loop in the background and
swapped in when ready; each replica records what it serves (serve_app.served).

The model runs off the event loop, in one forward thread (`ModelServer._run_batch`): the loop that parses
requests and decides admission is never held by a batch, so a request that will be refused is refused while a
batch runs, not after it (issue 16: overload refused within 10 ms of arrival; with the forward on the loop a
refusal waited behind the running batch). Batches still run one at a time and each takes what queued while the
last one ran, up to the cap: the server model the controllers assume (BatchingConfig.model_blocks_loop)."""

import asyncio
import contextlib
import errno
import gc
import hashlib
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
from ray import serve

from serve_app import form_choice
from serve_app.batching import (
    AdmissionControl,
    BatchingPolicy,
    BatchSettings,
    Controller,
    ModelQueue,
    Static,
    Verdict,
    WindowRecorder,
)
from serve_app.config import UNBATCHED, AppConfig, ModelUserConfig, served_artifact
from serve_app.metrics import ServeMetrics
from serve_app.protocol import INPUT_NAME, BadRequest, encode_infer, instances_to_array, parse_infer, parse_json
from serve_app.routes import Call, Reply
from serve_app.served import publish, split_load_delay

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def _logits(model, x: np.ndarray) -> np.ndarray:
    """The model's float32 logits (N, K) for images `x` (N, C, H, W): the one call the serving forward and the
    warm-up both make, so that the warm-up compiles exactly the graphs serving runs (an inference tensor made
    from numpy under inference_mode). No torch call besides the model's: each one hands the GIL off and waits to
    take it back, which beside the replica's busy event loops costs far more than the op (bench/inference_forms)."""
    import torch

    with torch.inference_mode():
        out = model(torch.from_numpy(x))
        return (out if out.dtype == torch.float32 else out.float()).numpy()


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in numpy (not torch: one GIL hand-off fewer per batch, `_logits`). Non-finite logits give
    NaN rows, as torch.softmax does (the routes answer those 422), without numpy's warnings."""
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


@dataclass(slots=True)
class InferStats:
    """The OIP statistics extension's counters for the one model (per replica)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    last_inference_ms: int = 0
    # per batch size (images in one forward): [forwards, ns] (Triton's batch_stats; bench/serving's cost model
    # reads the mean batch from them)
    batches: dict[int, list[int]] = field(default_factory=dict)

    def record(self, status: int, elapsed_s: float) -> None:
        ns = round(elapsed_s * 1e9)
        if status == 200:
            self.success, self.success_ns = self.success + 1, self.success_ns + ns
        else:
            self.fail, self.fail_ns = self.fail + 1, self.fail_ns + ns
        self.last_inference_ms = round(time.time() * 1e3)

    def batch(self, size: int, elapsed_s: float) -> None:
        """Counts one forward of `size` images that took `elapsed_s`."""
        row = self.batches.setdefault(size, [0, 0])
        row[0], row[1] = row[0] + 1, row[1] + round(elapsed_s * 1e9)

    def to_dict(self, name: str, version: str) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.success,
            "execution_count": sum(count for count, _ in self.batches.values()),
            "inference_stats": {
                "success": {"count": self.success, "ns": self.success_ns},
                "fail": {"count": self.fail, "ns": self.fail_ns},
                "queue": zero,
                "compute_input": zero,
                "compute_infer": zero,
                "compute_output": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": zero,
                    "compute_infer": {"count": count, "ns": ns},
                    "compute_output": zero,
                }
                for size, (count, ns) in sorted(self.batches.items())
            ],
        }


def _freeze_heap(collect_first: bool) -> None:
    """Moves every object the garbage collector tracks now into its permanent generation (gc.freeze), so that later
    full collections skip them. Loading a model and timing its forms (a compile among
    them) leaves ~0.6 M tracked objects in the process (0.18 M before, 0.62 M after fastest_inference_module on
    `small` 8x8), and a full collection walks them all holding the GIL, the serving loop's included: 0.31-0.34 s
    on a quiet core, more at Ray's worker niceness under load. That was the replica's stall under a burst: in 3 of
    9 runs of test_overload's bursts the replica answered its 503s all at once 0.64-0.80 s late. The first load
    collects first (nothing is served yet); a hot update does not, since that collection would stall the loop that
    serves meanwhile, so the cyclic garbage of its load, and the cyclic part of the model it replaces, stay frozen
    and are never freed (per update; acyclic objects still go by reference counting)."""
    if collect_first:
        gc.collect()
    gc.freeze()


@contextlib.contextmanager
def node_mutex(name: str, poll_s: float = 0.05):
    """Holds a mutex shared by the processes of this machine (its network namespace) while the block runs, waiting
    for it by polling: an abstract Unix socket bound to `name` (Linux: no file to leave behind, and the kernel
    frees it when the holder closes it or dies). Not a lock file: there is no per-cluster directory that every
    replica knows, and a file under /tmp would stay after the cluster."""
    key = "\0tandem/" + hashlib.sha256(name.encode()).hexdigest()[:40]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        while True:
            try:
                s.bind(key)
                break
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                time.sleep(poll_s)
        yield
    finally:
        s.close()


def _form_key(model, manifest: dict[str, Any], cap: int) -> tuple:
    """What an fp32 inference form is chosen for: the model's class and every tensor's name and shape (pruned
    channels change them), the input shape and the batch cap it was timed at."""
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return type(model).__qualname__, shapes, tuple(manifest["input_shape"]), cap


class ModelFault(Exception):
    """The model's output is not finite. Answered 422 when the model is sound on ordinary inputs (its warm-up on
    [0, 1) images was finite), so these inputs caused it (all 3e38, finite in float32, overflow a CNN); 500 when
    the model itself is broken (non-finite on the warm-up too, e.g. a bad quantization)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Ticket:
    """An admitted request (ModelServer._admit): when, admission's verdict (None for the unbatched controller,
    which has no admission control), and whether it goes through the batch queue."""

    t0: float
    verdict: Verdict | None
    batched: bool


class Overloaded(Exception):
    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict


@dataclass(slots=True)
class _Prepared:
    """A model ready to swap in (ModelServer._prepare): warmed up, its controller seeded by the warm-up."""

    model: Any
    manifest: dict[str, Any]
    version: str
    ctl: Controller
    sound: bool
    """Its outputs were finite on the warm-up (ModelFault's 422 vs 500)."""
    form: tuple[tuple, str] | None
    """(what the fp32 form was chosen for, the form's class name); None when no fp32 form was chosen."""


@dataclass(slots=True)
class _Queued:
    """A request's images while it waits for a batch, and the future its answer comes in."""

    x: np.ndarray
    answer: asyncio.Future
    """(probabilities (N, K), version), set by `ModelServer._run_batch`."""
    started: bool = False
    """In a batch the model runs (no longer in the queue count)."""
    cancelled: bool = False
    """The client left before its batch started: the model queue skips it."""


class ModelServer:
    """One replica: the model, its batching controller, admission control, metrics, and the routes' logic.

    `respond(route, body, name)` is the whole request path, callable through a handle (the canary Router does)
    as well as from this class's own HTTP routes.
    """

    def __init__(
        self, app: dict[str, Any], deployment: str = "Model", *, background_updates: bool | None = None
    ) -> None:
        """`background_updates`: whether a hot update returns from `reconfigure` at once and swaps in the background
        (see there); None: so in a Serve replica, where `reconfigure` holds the replica out of routing, while a
        ModelServer used directly (tests, tools) has nothing that does and applies each config before returning."""
        import torch
        from ray.serve.context import _get_internal_replica_context

        self.cfg = AppConfig.from_dict(app)
        self.deployment = deployment
        from models.fuse import FX_TRACE_LOCK

        torch.set_num_threads(self.cfg.torch_threads)
        # Taken by every forward of the serving model: a hot update's load traces the new model with torch.fx
        # beside the serving loop, and fx patches nn.Module.__call__ process-wide while it traces (models.fuse).
        # Re-entrant: a forward that compiles (a new batch shape) may trace inside it.
        self._model_lock = FX_TRACE_LOCK
        self.metrics = ServeMetrics(deployment, self.cfg.name)
        self.stats = InferStats()
        self.model = None
        self.manifest: dict[str, Any] = {}
        self.version = ""
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.user: ModelUserConfig | None = None
        # recorder, controller, admission control and its calibration (the simulator drives the same object)
        self.policy = BatchingPolicy(Static(), start=time.monotonic())
        self._control_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._lags: deque[float] = deque(maxlen=20)
        self._grace_until = 0.0
        self._sound = True
        # (what the fp32 form was chosen for, the form's class name): a hot update of the same model shape keeps
        # it (_prepare)
        self._form: tuple[tuple, str] | None = None
        # Hot updates (reconfigure): the config asked for last, a counter that tells a superseded load from the
        # current one, one load at a time, and the background swap in progress.
        self._wanted: ModelUserConfig | None = None
        self._generation = 0
        self._swap_lock = asyncio.Lock()
        self._swap_task: asyncio.Task | None = None
        self._in_replica = _get_internal_replica_context() is not None
        self._background_updates = self._in_replica if background_updates is None else background_updates
        # The controller learns t(b) from the batch's CPU time when the forward runs in this thread alone (one
        # torch thread, a CPU model): on a shared machine wall time includes the replica being preempted, and
        # outliers of 10-30x (measured under load here) drove the fit's p99 noise up, the cap to 1 and admission
        # into refusing at light load. Queueing and preemption still show in the latencies the SLOModel watches.
        self._clock = time.thread_time if self.cfg.torch_threads == 1 else time.perf_counter
        # The model runs here, one batch at a time, off the event loop (module docstring); torch's thread count
        # is per thread (OpenMP), so the forward thread sets its own. `_model_queue`: requests Serve's batch queue
        # handed on (or, with no batch wait, the request path put there), waiting for the model
        # (serve_app.batching.ModelQueue, the simulator's model queue too).
        self._executor = ThreadPoolExecutor(
            1, "forward", initializer=torch.set_num_threads, initargs=(self.cfg.torch_threads,)
        )
        self._model_queue: ModelQueue[_Queued] = ModelQueue(self.policy, skip=lambda it: it.cancelled)

    # -- hot update
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Applies `user_config` (a hot update). The first one (replica start-up) loads the model before this
        returns: a replica is not ready without one. Every later one returns at once: a background task loads,
        verifies and warms up the new model in a worker thread while this replica goes on serving with the
        current one, then swaps model and controller in one step on the event loop (requests in flight finish on
        whichever model their batch started with) and records what it serves (serve_app.served, which
        serve_app.deploy.roll_out waits on).

        Why return at once: while `reconfigure` runs, Serve holds the replica UPDATING and takes it out of
        HAProxy's backend (after RAY_SERVE_HAPROXY_BROADCAST_COALESCE_S, 2 s); an update whose load outlasted
        that on a loaded machine (a compile, a slow download, a starved thread) left no server, and HAProxy
        answered 503 (1 and 55 of 777 requests in two soaks at load 20-42). Why a thread: a synchronous load held
        the event loop for the whole load and warm-up, and the requests of that window queued where bounds
        refused some of them (14 of 945 once in CI)."""
        user_config, delay = split_load_delay(dict(user_config))
        user = ModelUserConfig.from_dict(user_config)
        if self._wanted is not None and asdict(user) == asdict(self._wanted):
            return
        self._wanted = user
        self._generation += 1
        if self.model is None or not self._background_updates:
            await self._swap_in(user, self._generation, delay)  # start-up: failures fail the replica's start
            return
        self._swap_task = asyncio.get_running_loop().create_task(
            self._swap_in_background(user, self._generation, delay)
        )

    async def settled(self) -> None:
        """Returns once no hot update is loading: the last `reconfigure`'s config serves, or failed to load."""
        while self._swap_task is not None and not self._swap_task.done():
            await self._swap_task

    async def _swap_in_background(self, user: ModelUserConfig, generation: int, delay_s: float) -> None:
        """`_swap_in` for a hot update: a failure leaves the current model serving and is recorded for the
        roll-out (RuntimeError there), not raised into Serve (which no longer waits on it)."""
        try:
            await self._swap_in(user, generation, delay_s, one_per_node=True)
        except Exception as e:
            logger.exception("%s: could not swap in %s; still serving version %s", self.deployment, user.artifact,
                             self.version)  # fmt: skip
            if generation == self._generation:
                self._wanted = self.user  # re-applying the failed config tries again
                await asyncio.to_thread(self._publish, user, f"{type(e).__name__}: {e}")

    async def _swap_in(
        self, user: ModelUserConfig, generation: int, delay_s: float, one_per_node: bool = False
    ) -> None:
        """Loads `user`'s model off the event loop and swaps it in, unless a later reconfigure superseded it
        (loads run one at a time; a superseded one is skipped or dropped). `one_per_node` (hot updates): the load
        waits its turn among this deployment's replicas on this node (`_prepare_in_turn`)."""
        async with self._swap_lock:
            if generation != self._generation:
                return
            new_model = self.user is None or (user.artifact, user.version) != (self.user.artifact, self.user.version)
            prepare = self._prepare_in_turn if one_per_node else self._prepare
            p = await asyncio.to_thread(prepare, user, new_model, delay_s)
            if generation != self._generation:
                return
            self.model, self.manifest, self.version, self._sound = p.model, p.manifest, p.version, p.sound
            self._form = p.form or self._form
            self.input_shape = tuple(p.manifest["input_shape"])
            self.policy.replace(p.ctl, enforce=user.admission)
            self.user = user
            self._grace_until = time.monotonic() + user.update_grace_s
            self._apply(p.ctl.settings)
            self._ensure_control_loop()  # from the start, so the gauges are exported before the first request
            if new_model:
                self.metrics.model_version(p.version)
                logger.info("%s: serving %s version %s", self.deployment, user.artifact, p.version)
        await asyncio.to_thread(self._publish, user, None)

    def _publish(self, user: ModelUserConfig, error: str | None) -> None:
        """Records what this replica serves (serve_app.served); nothing outside a Serve replica (unit tests)."""
        from ray.serve.context import _get_internal_replica_context

        ctx = _get_internal_replica_context()
        if ctx is not None:
            publish(ctx.app_name, ctx.deployment, ctx.replica_id.unique_id, user, error)

    def __del__(self) -> None:
        """Deletes this replica's record (serve_app.served) when Serve stops it (scale-down, replacement, its app
        deleted, Serve shut down: Serve calls `__del__` then) or it is garbage-collected, once."""
        if not getattr(self, "_in_replica", False) or getattr(self, "_forgotten", False):
            return
        self._forgotten = True
        from ray.serve.context import _get_internal_replica_context

        from serve_app.served import forget

        ctx = _get_internal_replica_context()
        if ctx is not None:
            forget(ctx.app_name, ctx.deployment, ctx.replica_id.unique_id)

    def _prepare_in_turn(self, user: ModelUserConfig, new_model: bool, delay_s: float = 0.0) -> "_Prepared":
        """`_prepare` while holding this node's turn for this deployment's hot-update loads (`node_mutex`), so that
        the deployment's replicas on a node load and warm up the new model one after another while the others
        serve at full speed. Serve reconfigures all replicas at once; with one replica per core (the default on
        one machine) every core then loads and warms up at once beside the load. Measured with 2 replicas on 2
        cores (bench/serving.py --replicas 2, one run each, not interleaved): before, 292 and 48 requests lost in
        2 of 6 plain re-applies at 0.33x and 0.66x of their unbatched capacity (the 292 with the load generator
        itself 337 ms late: the machine stalled); with the turn, 5 lost in 1 of 6 at 0.66x (generator on time);
        roll_out lost none in either (12 runs). Six runs a side cannot tell these apart: the turn is kept for
        what it removes by construction (every core loading at once), not for a measured gain."""
        import ray
        from ray.serve.context import _get_internal_replica_context

        ctx = _get_internal_replica_context()
        if ctx is None:
            return self._prepare(user, new_model, delay_s)
        with node_mutex(f"load/{ray.get_runtime_context().get_node_id()}/{ctx.app_name}/{ctx.deployment}"):
            return self._prepare(user, new_model, delay_s)

    def _prepare(self, user: ModelUserConfig, new_model: bool, delay_s: float = 0.0) -> "_Prepared":
        """The model, manifest, version and warmed-up controller for `user`; runs off the event loop.
        `delay_s`: the test hook's sleep (serve_app.served.LOAD_DELAY_KEY), a load made slow on purpose."""
        import torch

        from models.artifact import load_artifact
        from models.fuse import (
            CompiledInference,
            OneDNNInference,
            ScriptedInference,
            fastest_inference_module,
            inference_module,
        )
        from models.storage import local_copy

        time.sleep(delay_s)
        model, manifest, version, form = self.model, self.manifest, self.version, None
        if new_model:
            # a storage URI (s3://, gs://) is fetched to this replica's node: no replica reads the head's disk
            # (the copy goes once the model is in memory: none is left on a swap or at shutdown)
            with local_copy(served_artifact(user.artifact)) as path:  # a serving set: this hardware's form
                model, manifest = load_artifact(path)
            # an FP8 artifact runs on the replica's GPU (asked for by serve_app.config.default_num_gpus), inputs
            # moved there and outputs back; fp32 and INT8 stay on CPU (serve_app.placement.replica_device)
            from serve_app.placement import on_device, replica_device

            model = on_device(model, replica_device(manifest["quantization"]["scheme"], torch.cuda.is_available()))
            version = user.version or manifest["tensors"]["sha256"][:12]
        ctl = user.build_controller()
        if new_model and manifest["quantization"]["scheme"] == "none":
            # fp32: BN folded into the convs, compiled or not, whichever timed faster here at batch 1 and the
            # cap (the form the sweep measured; bench/results/train_throughput.json, whole_model_infer_ratio);
            # INT8 comes back from load_artifact already compiled as measured
            key = _form_key(model, manifest, ctl.config.max_batch_size)
            example = torch.rand(1, *manifest["input_shape"], generator=torch.Generator().manual_seed(0))
            sizes = (1, ctl.config.max_batch_size)
            threads = self.cfg.torch_threads
            chosen, why, choices = None, "", None
            if (recorded := form_choice.from_manifest(manifest, threads)) is not None:
                # the form the sweep timed for this artifact on a machine like this one: the served model is the
                # measured model, and nothing is timed here (serve_app/form_choice.py)
                (chosen, sizes, choices), why = recorded, "as the sweep measured it"
            elif self._form is not None and self._form[0] == key:
                # A hot update of the same architecture and shapes: the form chosen for it stands, and a
                # compiled one reuses the graphs already compiled here (CompiledInference: the weights are graph
                # inputs). Choosing again compiled and timed both forms beside the serving event loop, on the
                # same cores, for 2-25 s per graph on 2 cores: the update-time stall whose backlog HAProxy's
                # 64-in-flight cap refused (9 of 2741 requests at 0.66x capacity, bench/serving.py).
                chosen, why = self._form[1], "as before this update"
            elif self._in_replica:
                # another replica of this shape on this node timed the forms already (serve_app/form_choice.py)
                chosen, why = form_choice.recall(key, threads), "chosen on this node before"
            if chosen is not None:
                # The oneDNN form plans its convs again by timing them (no compile), unless the sweep's plans came
                # with the record.
                if chosen == CompiledInference.__name__:
                    model = CompiledInference(inference_module(model))
                elif chosen == OneDNNInference.__name__:
                    model = OneDNNInference(model, example, sizes, choices=choices)
                elif chosen == ScriptedInference.__name__:  # traced again: these weights are its constants
                    model = ScriptedInference(inference_module(model), example)
                else:
                    model = inference_module(model)
                logger.info("%s: fp32 form %s (%s)", self.deployment, type(model).__name__, why)
            else:
                model, timings = fastest_inference_module(model, example, sizes)
                logger.info("%s: fp32 form %s (%s)", self.deployment, type(model).__name__, timings)
                if self._in_replica:
                    form_choice.remember(key, threads, type(model).__name__)
            form = (key, type(model).__name__)
        sound = self._warm_up(model, tuple(manifest["input_shape"]), ctl)
        if new_model:
            _freeze_heap(collect_first=self.model is None)
        return _Prepared(model, manifest, version, ctl, sound, form)

    def _warm_up(self, model, input_shape: tuple[int, ...], ctl: Controller, rounds: int = 3) -> bool:
        """Runs the model on every power-of-two batch size up to the cap, `rounds` times, and seeds the new
        controller's service-time fit with all but the first round: the first calls after a load are slow
        (allocation, lazy init), and admission control predicting from them alone would refuse everything.
        Runs what serving runs (`_logits` on float32 numpy images) with this thread's torch threads set as the
        serving thread's: a compiled graph is guarded on its input's kind and on the thread's state, and a
        warm-up that differed (normal tensors from torch.rand) left an INT8 replica to recompile in its first
        request (1.6 s against 8-11 ms after it)."""
        import torch

        torch.set_num_threads(self.cfg.torch_threads)  # per thread (OpenMP): this one is a loader thread
        cap = ctl.config.max_batch_size
        sizes = sorted({min(2**i, cap) for i in range(cap.bit_length() + 1)})
        x = np.random.default_rng(0).random((cap, *input_shape), dtype=np.float32)  # (cap, C, H, W) in [0, 1)
        for r in range(rounds):
            for b in sizes:
                t0 = self._clock()
                out = _logits(model, x[:b])
                if r:
                    ctl.observe_batch(b, self._clock() - t0)
        return bool(np.isfinite(out).all())

    @property
    def ctl(self) -> Controller:
        return self.policy.controller

    @property
    def gate(self) -> AdmissionControl:
        return self.policy.admission

    @property
    def rec(self) -> WindowRecorder:
        return self.policy.recorder

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
            stats, st = self.policy.tick(time.monotonic())
            self._apply(st)
            self.metrics.window(stats, st)

    # -- inference
    async def infer(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """(probabilities (N, K), version) for images x (N, C, H, W); raises Overloaded when not admitted and
        ModelFault when the model's output is not finite."""
        return await self._infer_admitted(x, self._admit())

    def _admit(self) -> _Ticket:
        """Admission control for one request (raises Overloaded), decided before anything of the request is
        parsed: under overload a refusal costs no parsing (a 32x32 image's JSON: ~1 ms of the event loop's time
        that the requests behind it would wait for), and a bad request under overload gets the 503. The admitted
        request counts in the queue from now on: its parsing is work the next batch waits for.
        Measured through HAProxy (a 200-request burst, 64 let into the replica at a time, load 4-7): from the
        route's start a refusal took 0.05 ms (median; p90 1.7 ms, body read included), while HAProxy saw the
        replica's 503s a median 80-170 ms after they arrived. Re-measured with a client at Ray's worker niceness
        (bursts of n concurrent requests, all let in, queue bound 8, load 3-11, three runs): the replica's 503s
        took a median 11-33 ms at n=16 and 41-82 ms at n=64, and a GET /v2/health/live, which neither admission
        nor the model touches, 8-16 ms and 35-65 ms: the wait grows with the requests let in at once and lies
        before the route, in the replica's HTTP stack (uvicorn and Ray's direct-ingress wrapper, one GIL for
        every request let in). Fewer let in at once (a smaller per-replica cap at the ingress, tandem/local_ray.py's
        REPLICA_MAXCONN, which also caps the batch) shortens it most; user code on Ray's main loop
        (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, part of RAY_SERVE_THROUGHPUT_OPTIMIZED, since then tandem's
        default with HAProxy: tandem/local_ray.py) gave 9-10 ms at n=16 and 29-33 ms at n=64 in two runs (health
        route: 8-12 and 20-31 ms)."""
        self._ensure_control_loop()
        if self.user is not None and self.user.controller == UNBATCHED:
            return _Ticket(time.monotonic(), None, batched=False)
        # Admission control and its liveness rule, as the simulator runs them (BatchingPolicy.arrive); the loop's
        # lag is measured all the time, admitted requests or not.
        in_grace = time.monotonic() < self._grace_until  # just updated (ModelUserConfig.update_grace_s)
        arrival = self.policy.arrive(self.standing_lag(), in_grace)
        if not arrival.admitted:
            raise Overloaded(arrival.verdict)
        return _Ticket(time.monotonic(), arrival.verdict, batched=True)

    def _parse_admitted(self, ticket: _Ticket, parse: Callable[[], T]) -> T:
        """`parse()` for an admitted request; one that turns out bad leaves the queue count (not a rejection)."""
        try:
            return parse()
        except BaseException:
            if ticket.batched:
                self.policy.withdrawn()
            raise

    async def _infer_admitted(self, x: np.ndarray, ticket: _Ticket) -> tuple[np.ndarray, str]:
        verdict = ticket.verdict
        if not ticket.batched:
            t0 = time.perf_counter()
            probs, version = self._forward([x])[0]
            self.stats.batch(len(x), time.perf_counter() - t0)
        else:
            item = _Queued(x, asyncio.get_running_loop().create_future())
            try:
                if self.policy.settings.batch_wait_timeout_s > 0:
                    await self._batched(item)  # Serve's batch queue, then the model queue (_run_batch)
                else:
                    # No wait (SLOModel's setting with the model queue): Serve's batch queue would close each batch
                    # at once and hand it on unchanged, since the model queue applies the cap and merges what
                    # queued. Skipped, because its per-request signature check and per-batch metrics cost the event
                    # loop ~10% (profiled, note 12): adaptive served a median 1674 vs 1572 req/s that way (wrk, 32
                    # connections, 9 points each, three cluster starts alternated; static_default, unchanged,
                    # 1363 vs 1388).
                    self._model_queue.feed((item,), self._run_batch)
                probs, version = await item.answer
            except asyncio.CancelledError:  # the client gave up (timeout, disconnect)
                if not item.started:
                    # Ray drops cancelled requests from the next batch and the model queue skips them, so
                    # batch_start never counts this one: take it out of the queue here, or queue_len leaks
                    # upwards and admission refuses on a phantom backlog. (Counted as a rejection: it left
                    # unserved, an SLO miss either way.)
                    item.cancelled = True
                    self.policy.cancelled()
                raise
        self.policy.done(time.monotonic() - ticket.t0, verdict)
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
    async def _batched(self, items: list[_Queued]) -> list[None]:
        """Serve's batch queue closes a batch (its max_batch_size and wait, which the controller sets); this
        hands it on to the model queue and returns at once, so that Serve's one-batch-at-a-time loop never waits
        on the model: awaiting the model here would let Serve close the next batches while one runs and queue
        them behind it at whatever size the wait gave them (batches of one at a zero wait, serve_app/simulator's
        `handler="awaiting"`), while the model queue merges what queued into the next batch."""
        self._model_queue.feed(items, self._run_batch)
        return [None] * len(items)

    async def _run_batch(self, batch: list[_Queued]) -> None:
        """Runs one batch from the model queue (ModelQueue.drain: one at a time, each taking the requests waiting,
        oldest first, up to the controller's max_batch_size, as a synchronous forward on the event loop did) in
        the forward thread, while the loop goes on parsing, admitting and refusing requests."""
        n = len(batch)
        for it in batch:
            it.started = True
        t0 = time.perf_counter()
        try:
            out, work = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._timed_forward, [it.x for it in batch]
            )
        except Exception as e:  # the model failed: every request of the batch gets it (a 500)
            for it in batch:
                if not it.answer.done():
                    it.answer.set_exception(e)
            return
        self.policy.batch_end(n, work)
        elapsed = time.perf_counter() - t0
        self.metrics.batch(n, elapsed)
        self.stats.batch(sum(len(it.x) for it in batch), elapsed)
        for it, answer in zip(batch, out, strict=True):
            if not it.answer.done():  # not cancelled meanwhile
                it.answer.set_result(answer)

    def _timed_forward(self, xs: list[np.ndarray]) -> tuple[list[tuple[np.ndarray, str]], float]:
        """`_forward` and its time by `_clock`, taken in the thread that runs it (thread_time is per thread)."""
        c0 = self._clock()
        out = self._forward(xs)
        return out, self._clock() - c0

    def _forward(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Runs the model on the requests' images concatenated (the forward thread; the unbatched controller's
        requests run it on the event loop: no admission control there to keep answering)."""
        model, version = self.model, self.version  # one model per batch, even across a hot update
        sizes = [len(x) for x in xs]
        with self._model_lock:
            logits = _logits(model, np.concatenate(xs))  # (sum N, K)
        probs = _softmax(logits)
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
            ticket = self._admit()
            x = self._parse_admitted(
                ticket,
                lambda: instances_to_array(
                    parse_json(body, self.cfg.max_body_bytes).get("instances"), self.input_shape, self.cfg.max_instances
                ),
            )
            probs, version = await self._infer_admitted(x, ticket)
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
            ticket = self._admit()
            req = self._parse_admitted(
                ticket,
                lambda: parse_infer(
                    body, call.header_length, self.input_shape, self.cfg.max_instances, self.cfg.max_body_bytes
                ),
            )
            probs, version = await self._infer_admitted(req.x, ticket)
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
