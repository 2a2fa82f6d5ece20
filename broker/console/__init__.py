"""The web console: page shells only. Every datum is fetched by the browser from the JSON API.

The pages hold nothing about the caller. The bearer token is pasted into the page, kept in
the tab's `sessionStorage` and sent by `fetch` as `Authorization: Bearer`, so no cookie
carries authority (nothing for CSRF to ride on) and the API's own checks decide what a
token may see. The server renders the same shell for everyone, signed in or not.

Threat model for the pages: workload-provided strings (purpose, owner, context, reasons)
are hostile. The scripts insert them with `textContent` only, and the Content Security
Policy below forbids inline script and style, so a string that slipped into markup anyway
still could not run.
"""

from __future__ import annotations

import uuid

from flask import Blueprint, Response, render_template, request

from broker.audit.events import AUDIT_EVENTS

bp = Blueprint(
    "console",
    __name__,
    url_prefix="/console",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

PREFIX = "/console"

# Sent on every response under /console, errors and static files included.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # The page URL names task and lease ids; they need not reach anyone else.
    "Referrer-Policy": "no-referrer",
    # A shared machine's disk cache should not keep even the page shells.
    "Cache-Control": "no-store",
}


def _page(view: str, subject: uuid.UUID | None = None) -> str:
    # `subject` is a UUID parsed by the route converter, so it is safe in an attribute.
    return render_template(
        f"console/{view}.html",
        view=view,
        subject=str(subject) if subject else "",
        # The audit view's event filter offers every recorded event; the API takes any name.
        events=list(AUDIT_EVENTS),
    )


@bp.get("/")
def home() -> str:
    """Operators land on leases, approvers on approvals: the script decides by asking the API."""
    return _page("home")


@bp.get("/leases")
def leases() -> str:
    return _page("leases")


@bp.get("/leases/<uuid:lease_id>")
def lease(lease_id: uuid.UUID) -> str:
    return _page("lease", lease_id)


@bp.get("/tasks/<uuid:task_id>")
def task(task_id: uuid.UUID) -> str:
    return _page("task", task_id)


@bp.get("/approvals")
def approvals() -> str:
    return _page("approvals")


@bp.get("/approvals/<uuid:task_id>")
def approval(task_id: uuid.UUID) -> str:
    return _page("approval", task_id)


@bp.get("/kill-switch")
def kill_switch() -> str:
    return _page("kill_switch")


@bp.get("/audit")
def audit() -> str:
    return _page("audit")


@bp.after_app_request
def _secure(response: Response) -> Response:
    # App-wide so that a 404 or 405 under /console, which matches no console route and so
    # no blueprint, carries the headers too. The JSON API is left as it is.
    if request.path == PREFIX or request.path.startswith(PREFIX + "/"):
        response.headers.update(SECURITY_HEADERS)
    return response
