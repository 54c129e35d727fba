"""Which servicer an HTTP app (the JSON API and the dashboard) serves.

    host(servicer, app)     the Codec replica does this for Serve's copy of the app; so can any ASGI
                            server, or a test (fastapi.testclient over `http_api.api`)
    servicer_of(request)    what every route calls
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request

if TYPE_CHECKING:
    from .servicer import ProgsaeServicer

_hosted: list[ProgsaeServicer] = []
"""The servicer of this process's Serve replica: Serve serves a frozen copy of the app, whose state
`host` cannot reach, so the replica's servicer is also kept here."""


def host(servicer: ProgsaeServicer, app: FastAPI) -> FastAPI:
    """Serve `servicer` on `app`."""
    app.state.servicer = servicer
    _hosted[:] = [servicer]
    return app


def servicer_of(request: Request) -> ProgsaeServicer:
    sv = getattr(request.app.state, "servicer", None)
    return sv if sv is not None else _hosted[0]
