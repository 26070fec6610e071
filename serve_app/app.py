"""The Serve application: a model deployment with adaptive batching behind JSON and Open Inference Protocol routes.

`build_app(args)` is the application builder that `serve run serve_app.app:build_app artifact=...` and
`serve deploy serve_app/serve_config.yaml` import. Without a canary the app is one deployment, `Model`, that is
also the HTTP ingress (one hop; with tandem's HAProxy ingress HAProxy sends HTTP straight to it, see
tandem/local_ray.py; inside the replica POST /predict and the OIP infer routes are answered past FastAPI,
serve_app/routes.py `Ingress`);
with a canary (`args["canary"]`) a `Router` ingress splits traffic between two such deployments, `Model` (stable)
and `Canary` (serve_app/router.py). This module holds only the deployments and the builder; by concept:
serve_app/config.py (AppConfig, ModelUserConfig, CanaryConfig), serve_app/protocol.py (wire formats),
serve_app/routes.py (Call, Reply, the FastAPI routes, the replica's ASGI app), serve_app/replica.py (ModelServer),
serve_app/router.py.

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

import os
from dataclasses import asdict
from typing import Any

from ray import serve

from serve_app.config import AppConfig
from serve_app.placement import replica_placement
from serve_app.replica import ModelServer
from serve_app.router import Router
from serve_app.routes import IngressMixin

__all__ = ["AppConfig", "Backend", "Model", "build_app"]


class _ModelIngress(ModelServer, IngressMixin):
    api_title = "tandem model server"


# serve.ingress() without an app: each replica builds its own (IngressMixin.__serve_build_asgi_app__).
Model = serve.deployment(name="Model")(serve.ingress()(_ModelIngress))
# Behind the canary Router: the same replica without HTTP routes (Serve allows one FastAPI ingress per app).
Backend = serve.deployment(name="Backend")(ModelServer)


# ----------------------------------------------------------------------------------------------- builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run serve_app.app:build_app artifact=DIR [...]` (fields of `AppConfig`)."""
    cfg = AppConfig.from_dict(dict(args))
    app_dict = cfg.to_dict()
    model_opts: dict[str, Any] = {
        "max_ongoing_requests": cfg.max_ongoing_requests(),
        "ray_actor_options": {"num_cpus": cfg.num_cpus, **replica_placement()},
        "health_check_period_s": 2,
    }
    # The bound is the Python proxy's: with the HAProxy ingress (the cluster's RAY_SERVE_ENABLE_HA_PROXY, read here
    # at the builder, in the cluster's environment) there is no proxy queue, Serve enforces it in each replica
    # on requests not yet past the replica's event loop, and it refused requests that a synchronous batch merely
    # delayed (4-48 of 777 at 100 req/s on a loaded machine, before any update). The replica's own admission
    # control (max_queue_len, the SLO prediction) bounds its queue there.
    if cfg.max_queued_requests is not None and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
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
    stable = Backend.options(name="Model", user_config=asdict(cfg.model_user_config()), **model_opts)
    canary = Backend.options(name="Canary", user_config=asdict(cfg.canary_user_config()), **model_opts)
    return Router.options(
        max_ongoing_requests=2 * cfg.max_ongoing_requests() * max(1, cfg.num_replicas),
        ray_actor_options={"num_cpus": 1, **replica_placement()},
        user_config=cfg.canary_policy(),
    ).bind(app_dict, stable.bind(app_dict, "Model"), canary.bind(app_dict, "Canary"))
