"""`BatchingPolicy`: one replica's batching and admission state (recorder, controller, admission control and its
calibration) behind the few calls a request path makes. The replica (serve_app/replica.py, `ModelServer`) and
the simulator (serve_app/simulator.py) both drive it, so a controller trained or scored in the simulator (the
bandit's pre-training) meets the rules the replica applies: the same admission check in the same order, the
same liveness rule, the same window bookkeeping."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from serve_app.batching.admission import AdmissionControl, LatencyCalibration, Verdict
from serve_app.batching.controllers import Controller
from serve_app.batching.settings import BatchingConfig, BatchSettings
from serve_app.batching.window import WindowRecorder, WindowStats


@dataclass(frozen=True, slots=True)
class Arrival:
    """What `BatchingPolicy.arrive` decided for one request."""

    admitted: bool
    verdict: Verdict
    """Admission control's verdict (computed whether or not it is enforced: its prediction calibrates)."""


class BatchingPolicy:
    """The calls, in a request's order: `arrive` (admit or refuse; counted either way), then for an admitted
    request `batch_start` / `batch_end` around its batch and `done` with its latency, or `cancelled` when it
    left before its batch started; `tick` once per control window returns the window's stats and the settings
    to apply. `replace` swaps in a new controller (a hot update) and keeps the recorder, whose queue count
    spans the swap.

    `enforce`: refuse what admission control refuses (ModelUserConfig.admission); off, every request is queued
    but still predicted. `calibrate`: feed the latency calibration from answered requests (the replica, where
    work outside the batch model exists; the simulator's batch model is the whole server, and its virtual time
    would not drive the calibration's forgetting in time)."""

    def __init__(
        self,
        controller: Controller,
        *,
        enforce: bool = True,
        calibrate: bool = True,
        start: float = 0.0,
        admission: AdmissionControl | None = None,
        calibration: Callable[[], LatencyCalibration] = LatencyCalibration,
    ) -> None:
        """`admission`: a gate of its own (another config than the controller's); by default one for the
        controller's config, as `replace` makes."""
        if not isinstance(controller, Controller):
            raise TypeError(f"controller must be a Controller, got {type(controller).__name__}")
        if admission is not None and not isinstance(admission, AdmissionControl):
            raise TypeError(f"admission must be an AdmissionControl or None, got {type(admission).__name__}")
        self.enforce, self.calibrate = bool(enforce), bool(calibrate)
        self._calibration = calibration
        self.recorder = WindowRecorder(start)
        self.controller = controller
        self.admission = admission if admission is not None else AdmissionControl(controller.config, calibration())

    def replace(self, controller: Controller, *, enforce: bool | None = None) -> None:
        """A new controller (and admission control for its config, calibration from scratch); the recorder
        and what it counts stay."""
        if not isinstance(controller, Controller):
            raise TypeError(f"controller must be a Controller, got {type(controller).__name__}")
        self.controller = controller
        self.admission = AdmissionControl(controller.config, self._calibration())
        if enforce is not None:
            self.enforce = bool(enforce)

    @property
    def config(self) -> BatchingConfig:
        return self.controller.config

    @property
    def settings(self) -> BatchSettings:
        return self.controller.settings

    @property
    def queue_len(self) -> int:
        return self.recorder.queue_len

    def arrive(self, lag_s: float = 0.0, in_grace: bool = False) -> Arrival:
        """Asks admission control with the queue as it stands and the event loop's standing lag, applies the
        liveness rule (AdmissionControl.refuses), and records the arrival (and the refusal)."""
        queued = self.recorder.queue_len
        verdict = self.admission.check(queued, self.controller, lag_s)
        self.recorder.arrival()
        if self.enforce and self.admission.refuses(verdict, queued, lag_s, in_grace):
            self.recorder.rejected()
            return Arrival(False, verdict)
        return Arrival(True, verdict)

    def cancelled(self) -> None:
        """An admitted request left before its batch started (client timeout or disconnect): out of the queue
        count, as a rejection (it left unserved)."""
        self.recorder.rejected()

    def withdrawn(self) -> None:
        """An admitted request turned out bad (the replica admits before it parses: a 4xx follows): out of the
        queue count, not a rejection (nothing was refused)."""
        self.recorder.withdrawn()

    def batch_start(self, size: int) -> None:
        self.recorder.batch_start(size)

    def batch_end(self, size: int, service_s: float) -> None:
        """A batch of `size` ran for `service_s` (the model's own time): recorded, and taught to the
        controller's service-time fit."""
        self.recorder.batch_end(size, service_s)
        self.controller.observe_batch(size, service_s)

    def done(self, latency_s: float, verdict: Verdict | None = None) -> None:
        """An answered request, `latency_s` after its arrival; `verdict` (its `arrive`'s) calibrates."""
        self.recorder.done(latency_s)
        if self.calibrate and verdict is not None and verdict.model_latency_s is not None:
            self.admission.calibration.observe(verdict.model_latency_s, latency_s)

    def tick(self, now: float) -> tuple[WindowStats, BatchSettings]:
        """Closes the control window at `now`; (its stats, the settings the controller decides)."""
        stats = self.recorder.close(now)
        return stats, self.controller.update(stats)
