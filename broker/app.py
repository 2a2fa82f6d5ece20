"""The Flask application factory. No import-time side effects: everything hangs off Services."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flask import Flask, Response
from werkzeug.exceptions import HTTPException

from broker import tracing
from broker.api.problems import register_error_handlers
from broker.config import Settings
from broker.services import Services, build_services

SERVICES_KEY = "broker.services"


class BrokerFlask(Flask):
    def make_default_options_response(self) -> Response:
        """`OPTIONS`: 204 with `Allow` and no body (docs/api.md).

        Flask's own answer is an empty `text/html` page; nothing the API answers is HTML.
        """
        allow = super().make_default_options_response().headers["Allow"]
        response = Response(status=204, headers={"Allow": allow})
        del response.headers["Content-Type"]
        return response


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> Flask:
    if services is None:
        if settings is None:
            from broker.config import load_settings

            settings = load_settings()
        services = build_services(settings)
    app = BrokerFlask("broker")
    app.config.update(
        # One byte over the limit may be read, so a chunked body (no Content-Length) that
        # is too large is seen as such and answered 413, not cut short into bad JSON.
        MAX_CONTENT_LENGTH=services.settings.limits.max_body_bytes + 1,
        JSON_SORT_KEYS=False,
    )
    app.extensions[SERVICES_KEY] = services
    logging.getLogger("broker").setLevel(services.settings.log_level)
    register_error_handlers(app)
    _register_blueprints(app)
    _time_requests(app)
    if services.settings.tracing is not None:
        app.wsgi_app = tracing.TracingMiddleware(app.wsgi_app, _route_of(app))  # type: ignore[method-assign]
    return app


def _time_requests(app: Flask) -> None:
    from time import perf_counter

    from flask import request

    from broker import logs, metrics

    access = logging.getLogger("broker.access")
    # One latency child per (route, status): `labels()` takes the metric's lock and builds
    # a key on every call, which was a third of these hooks' cost per request.
    latency: dict[tuple[str, int], Any] = {}

    @app.before_request
    def _started() -> None:
        # The request's log fields double as its start time and id: one dict per request.
        logs.begin_request(
            request_id=logs.request_id_from(request.headers.get(logs.REQUEST_ID_HEADER)),
            method=request.method,
            started=perf_counter(),
        )

    @app.after_request
    def _observed(response: Response) -> Response:
        # The route template, not the path: ids must not become label values.
        rule = request.url_rule
        endpoint = rule.rule if rule is not None else "unmatched"
        fields = logs.current_request()
        now = perf_counter()
        elapsed = now - fields.get("started", now)
        status = response.status_code
        child = latency.get((endpoint, status))
        if child is None:
            child = latency[endpoint, status] = metrics.REQUEST_LATENCY.labels(endpoint, str(status))
        child.observe(elapsed)
        request_id = fields.get("request_id") or logs.request_id_from(None)
        response.headers[logs.REQUEST_ID_HEADER] = request_id
        fields["route"], fields["status"] = endpoint, status
        task_id = request.view_args.get("task_id") if request.view_args else None
        if task_id is not None:
            fields["task_id"] = str(task_id)
        if access.isEnabledFor(logging.INFO):  # off at log_level WARNING: nothing is built then
            access.info("%s %s %s %.1f ms", request.method, endpoint, status, elapsed * 1000)
        return response

    @app.teardown_request
    def _ended(_error: BaseException | None) -> None:
        logs.end_request()


def _route_of(app: Flask) -> Callable[[dict[str, Any]], str]:
    def route(environ: dict[str, Any]) -> str:
        try:
            rule, _ = app.url_map.bind_to_environ(environ).match(return_rule=True)
        except HTTPException:
            return "unmatched"
        return str(rule.rule)

    return route


def _register_blueprints(app: Flask) -> None:
    from broker import console
    from broker.api import approvals, catalogue, health, operator, tasks

    for blueprint in (health.bp, tasks.bp, catalogue.bp, approvals.bp, operator.bp, console.bp):
        app.register_blueprint(blueprint)
