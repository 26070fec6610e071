"""Canary rollout: a Router ingress splits traffic between the stable and the canary Model deployments by weight,
compares them over a window, and promotes or rolls back the canary automatically.

Serve 2.x has no traffic splitting (1.x's `set_traffic` is gone; ray#63016 asks for canaries with automatic
rollback), so the split is a deployment of its own. `CanaryPolicy` is plain Python (tested without Ray):
- split: smooth deterministic weighting (request i goes to the canary when floor((i+1) w) > floor(i w)), so any
  run of requests carries the weight exactly, not only on average;
- every `window_s`, once each side has `min_requests` in the window: roll back when the canary's error rate
  exceeds the stable's by more than `max_error_rate_delta`, or its p99 exceeds `max_p99_ratio` times the stable's
  (plus `p99_slack_s`, so that two fast p99s a millisecond apart are not a regression); promote after
  `promote_after` consecutive healthy windows. Errors are 5xx answers and failed calls (4xx are the client's).
After a decision the Router sends everything to the winner: the canary's model ("promoted") or the stable's
("rolled_back"). The decision is logged and exported (`tandem_serve_canary_decisions_total{decision}`,
`tandem_serve_canary_state`, `tandem_serve_canary_weight`); `GET /canary` shows the live state. Making a promoted
canary the new stable is one more hot update (serve_app.deploy.hot_update with the canary's artifact).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from ray import serve

from serve_app.config import AppConfig, CanaryConfig
from serve_app.metrics import PREFIX, MetricBuffer, MetricSpec
from serve_app.routes import Call, Ingress, IngressMixin, Reply

logger = logging.getLogger("ray.serve")

STABLE, CANARY = "stable", "canary"
RUNNING, PROMOTED, ROLLED_BACK = "running", "promoted", "rolled_back"
_STATE_VALUE = {RUNNING: 0, PROMOTED: 1, ROLLED_BACK: -1}


@dataclass(slots=True)
class _Side:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)] if xs else 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """A closed window's verdict."""

    state: str
    """running (no decision yet), promoted or rolled_back."""
    reason: str
    stable: dict[str, float]
    """requests, error_rate, p99_s of the stable side in the window."""
    canary: dict[str, float]


class CanaryPolicy:
    """Split, bookkeeping and the promote/rollback rule (module docstring); the caller supplies the clock."""

    def __init__(self, config: CanaryConfig, now: float) -> None:
        self.config = config
        self.state = RUNNING
        self.decision: Decision | None = None
        """The last closed window's verdict."""
        self.healthy_windows = 0
        self.sent = {STABLE: 0, CANARY: 0}
        self._i = 0
        self._window_start = now
        self._sides = {STABLE: _Side(), CANARY: _Side()}

    @property
    def weight(self) -> float:
        """The canary's current share: the configured weight while running, then 1 or 0."""
        return {RUNNING: self.config.weight, PROMOTED: 1.0, ROLLED_BACK: 0.0}[self.state]

    def route(self) -> str:
        w = self.weight
        i = self._i
        self._i += 1
        side = CANARY if math.floor((i + 1) * w) > math.floor(i * w) else STABLE
        self.sent[side] += 1
        return side

    def record(self, side: str, status: int, latency_s: float) -> None:
        """An answered request (status 599 for a call that failed without an HTTP answer)."""
        s = self._sides[side]
        s.requests += 1
        s.errors += status >= 500
        s.latencies.append(latency_s)

    def tick(self, now: float) -> Decision | None:
        """Closes the window when `window_s` has passed; returns its Decision once a rollout is decided or the
        window was evaluated (None while the window is open or after a final decision)."""
        if self.state != RUNNING or now - self._window_start < self.config.window_s:
            return None
        st, ca = self._sides[STABLE], self._sides[CANARY]
        self._window_start = now
        self._sides = {STABLE: _Side(), CANARY: _Side()}
        cfg = self.config
        summary = {
            side: {"requests": s.requests, "error_rate": s.error_rate, "p99_s": s.p99()}
            for side, s in ((STABLE, st), (CANARY, ca))
        }
        if min(st.requests, ca.requests) < cfg.min_requests:
            reason = f"too few requests (stable {st.requests}, canary {ca.requests} < {cfg.min_requests})"
        elif ca.error_rate > st.error_rate + cfg.max_error_rate_delta:
            self.state = ROLLED_BACK
            reason = f"canary error rate {ca.error_rate:.3f} > stable {st.error_rate:.3f} + {cfg.max_error_rate_delta}"
        elif ca.p99() > cfg.max_p99_ratio * st.p99() + cfg.p99_slack_s:
            self.state = ROLLED_BACK
            reason = (
                f"canary p99 {ca.p99() * 1e3:.1f} ms > {cfg.max_p99_ratio} x stable p99 {st.p99() * 1e3:.1f} ms"
                f" + {cfg.p99_slack_s * 1e3:.0f} ms"
            )
        else:
            self.healthy_windows += 1
            reason = f"healthy window {self.healthy_windows}/{cfg.promote_after}"
            if self.healthy_windows >= cfg.promote_after:
                self.state = PROMOTED
                reason = f"{cfg.promote_after} healthy windows: error rate and p99 within thresholds"
        self.decision = Decision(self.state, reason, summary[STABLE], summary[CANARY])
        return self.decision

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "weight": self.weight,
            "config": asdict(self.config),
            "sent": dict(self.sent),
            "healthy_windows": self.healthy_windows,
            "decision": asdict(self.decision) if self.decision is not None else None,
        }


CANARY_METRICS: dict[str, MetricSpec] = {
    s.name.removeprefix(PREFIX + "canary_"): s
    for s in (
        MetricSpec("counter", PREFIX + "canary_decisions", "Canary rollouts decided, by decision.", ("decision",)),
        MetricSpec("gauge", PREFIX + "canary_state", "Canary state: 0 running, 1 promoted, -1 rolled back."),
        MetricSpec("gauge", PREFIX + "canary_weight", "Share of traffic sent to the canary."),
        MetricSpec("counter", PREFIX + "canary_requests", "Requests routed, by side and status.", ("side", "status")),
    )
}
"""The router's metrics, recorded in a MetricBuffer (per request: no ray.util.metrics call on the event loop)."""


class RouterServer:
    """Ingress of a canary app: same routes as the Model, forwarded to the stable or canary deployment."""

    def __init__(self, app: dict[str, Any], stable, canary) -> None:
        self.cfg = AppConfig.from_dict(app)
        self.handles = {STABLE: stable, CANARY: canary}
        self.metrics = MetricBuffer(CANARY_METRICS, {"deployment": "Router", "model": self.cfg.name})
        self.policy = CanaryPolicy(CanaryConfig(), time.monotonic())
        self._task: asyncio.Task | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new canary policy (a new rollout): the comparison starts over."""
        self.policy = CanaryPolicy(CanaryConfig.from_dict(user_config), time.monotonic())
        self._export()

    def _export(self) -> None:
        self.metrics.set("state", _STATE_VALUE[self.policy.state])
        self.metrics.set("weight", self.policy.weight)
        self.metrics.flush()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            d = self.policy.tick(time.monotonic())
            self.metrics.flush()  # the requests routed meanwhile
            if d is None:
                continue
            if d.state == RUNNING:
                logger.info("canary window: %s (stable %s, canary %s)", d.reason, d.stable, d.canary)
                continue
            logger.warning("canary %s: %s (stable %s, canary %s)", d.state, d.reason, d.stable, d.canary)
            self.metrics.inc("decisions", (("decision", d.state),))
            self._export()

    async def respond(self, call: Call) -> Reply:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())
        policy = self.policy
        route = call.route
        side = policy.route() if route in ("predict", "infer") else STABLE
        t0 = time.monotonic()
        try:
            reply = await self.handles[side].respond.remote(call)
        except Exception as e:  # the replica died or the call failed: the client gets a 503, the canary a miss
            logger.warning("router: %s call failed: %s", side, e)
            reply = Reply.error(503, f"{side} backend unavailable: {type(e).__name__}", {"Retry-After": "1"})
            status = 599
        else:
            status = reply.status
        if route in ("predict", "infer"):
            policy.record(side, status, time.monotonic() - t0)
            self.metrics.inc("requests", (("side", side), ("status", str(status))))
        return reply


class _RouterIngress(RouterServer, IngressMixin):
    api_title = "tandem canary router"

    def __serve_build_asgi_app__(self) -> Ingress:
        app = super().__serve_build_asgi_app__()

        @app.api.get("/canary")
        async def canary_status() -> JSONResponse:
            return JSONResponse(self.policy.status())

        return app


Router = serve.deployment(name="Router")(serve.ingress()(_RouterIngress))
