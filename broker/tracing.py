"""OpenTelemetry spans for a request and its policy, Vault and database steps, when asked for.

Off unless config `tracing` is set and the `otel` extra (opentelemetry-sdk) is installed.
Off, `span()` hands back one shared no-op context manager: no import of OpenTelemetry, no
allocation, one global read per step, which is what "zero cost when off" can mean in Python.
On, spans go to the exporter the config names; their attributes are identifiers and states
(route, operation, task type), never a token, a request body or a secret value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from broker.config import ConfigError

if TYPE_CHECKING:
    from broker.config import TracingSettings

_NOOP: AbstractContextManager[None] = contextlib.nullcontext()


class _Switch:
    # The tracer's start function while tracing is on; None is off.
    start: Callable[..., AbstractContextManager[Any]] | None = None


_switch = _Switch()


def span(name: str, **attributes: str | int | bool) -> AbstractContextManager[Any]:
    """A span named `name` around a step, or nothing at all when tracing is off."""
    start = _switch.start
    if start is None:
        return _NOOP
    return start(name, attributes=attributes)


def configure(settings: TracingSettings | None, *, exporter: Any = None) -> None:
    """Turn tracing on for this process (after any fork), or leave it off.

    `exporter` replaces the configured one (tests pass an in-memory exporter).
    """
    if settings is None:
        _switch.start = None
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise ConfigError("tracing: needs the otel extra: pip install 'credential-broker[otel]'") from None

    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(settings.exporter)))
    _switch.start = provider.get_tracer("credential-broker").start_as_current_span


def _exporter(kind: str) -> Any:
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # OTLP over HTTP; endpoint, headers and TLS come from the standard OTEL_EXPORTER_OTLP_* env.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


class TracingMiddleware:
    """A server span per request, named by method and route template (never the raw path)."""

    def __init__(self, app: Any, route_of: Callable[[dict[str, Any]], str]) -> None:
        self._app = app
        self._route_of = route_of

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        method = str(environ.get("REQUEST_METHOD", ""))
        with span(f"{method} {self._route_of(environ)}", **{"http.request.method": method}):
            yield from self._app(environ, start_response)
