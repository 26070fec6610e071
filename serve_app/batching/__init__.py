"""Adaptive batching for a Serve model deployment: controllers that set `@serve.batch`'s knobs every window.

One module per concept: settings (BatchingConfig, BatchSettings), window (WindowRecorder, WindowStats), fit
(ServiceTimeFit), controllers, bandit, admission (LatencyCalibration, Verdict, AdmissionControl), policy
(BatchingPolicy: all of them behind the calls a request path makes) and modelqueue (ModelQueue: the batches a
forward takes); the replica and the simulator drive the last two.
This package re-exports their public names.

Plain Python, no Ray: the Serve app (and the simulator in serve_app/simulator.py) feeds a `WindowRecorder`
with what happens to requests and batches, closes it every `BatchingConfig.window_s` seconds, and hands the
resulting `WindowStats` to a controller, whose `update()` returns the `BatchSettings` to pass to the batch
wrapper's `set_max_batch_size` / `set_batch_wait_timeout_s`. `AdmissionControl` decides per request whether to
queue it or answer 503 + Retry-After at once (issue 6, "Overload protection").

Controllers (one class each, common interface `Controller`):
- `Static`: fixed settings, what `@serve.batch` does today (`Static.serve_defaults()` = 10 / 0.01 s).
- `AIMD`: Clipper (Crankshaw et al., NSDI'17): grow the batch size additively while batches run within the
  SLO's share, cut it multiplicatively when one does not.
- `SLOModel` (the default): fits t(b) = a + c*b online; the largest cap whose worst case fits the SLO, and
  the wait that lets batches fill at the current rate when the model call does not block the loop.
- `Bandit`: contextual epsilon-greedy bandit over a (batch size, wait) grid per load level; JSON save/load.

Server model behind the latency estimates: one batch executes at a time (`max_concurrent_batches=1`); a batch
opens when a request waits, and closes when it holds `max_batch_size` requests or `batch_wait_timeout_s` after
it opened (Ray's `_BatchQueue.wait_for_batch`). If the next batch forms only once the running one returns
(`BatchingConfig.model_blocks_loop`, the default: a synchronous forward pass in the handler, or the replica's own
model queue, which runs the model in a thread and merges what queued meanwhile without holding the event loop),
batches take what queued while the last one ran; if the handler awaits the model instead, Ray closes the next
batch while one executes, and only the wait lets batches grow (serve_app/simulator.py simulates each).
"""

from serve_app.batching.admission import AdmissionControl, LatencyCalibration, Verdict
from serve_app.batching.bandit import Bandit, BanditConfig, load_bandit_policy, window_reward
from serve_app.batching.controllers import AIMD, Controller, SLOModel, Static
from serve_app.batching.fit import ServiceTimeFit
from serve_app.batching.modelqueue import ModelQueue
from serve_app.batching.policy import Arrival, BatchingPolicy
from serve_app.batching.settings import SERVE_DEFAULT_BATCH_SIZE, SERVE_DEFAULT_WAIT_S, BatchingConfig, BatchSettings
from serve_app.batching.window import WindowRecorder, WindowStats

__all__ = [
    "AIMD",
    "SERVE_DEFAULT_BATCH_SIZE",
    "SERVE_DEFAULT_WAIT_S",
    "AdmissionControl",
    "Arrival",
    "Bandit",
    "BanditConfig",
    "BatchSettings",
    "BatchingConfig",
    "BatchingPolicy",
    "Controller",
    "LatencyCalibration",
    "ModelQueue",
    "SLOModel",
    "ServiceTimeFit",
    "Static",
    "Verdict",
    "WindowRecorder",
    "WindowStats",
    "load_bandit_policy",
    "window_reward",
]
