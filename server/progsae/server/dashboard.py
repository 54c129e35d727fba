"""The dashboard's HTTP routes, mounted on the HTTP/JSON API (server/http_api.py) of the same app.

    GET /                          the page (static/index.html), offline: no CDN
    GET /static/{file}             its script and style sheet
    GET /api/overview              served checkpoints with their metrics.json curves (G, FVU,
                                   CE recovered, L0 per ordering), whether feature cards exist,
                                   and the text limits
    GET /api/feature?model_id&latent
                                   one latent's feature card; `latent` is the index the stream
                                   reports (the served order), mapped through the ordering's
                                   permutation to the trained order the cards are stored in
    GET /api/labels?model_id&latents=3,17,40
                                   {latent: short label} for feature chips (FeatureCards.label:
                                   "position (first token)" / "dense (fires on N% of tokens)" for
                                   such latents, else the tokens its top contexts peak on, else
                                   its top promoted tokens), `latent` in the served order as above
Errors answer {"code", "message"} with the matching HTTP status, like the rest of the API.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response

from progsae.sae import checkpoint, feature_cards

from .call import HttpCall
from .errors import ServiceError, invalid, not_found
from .http_host import servicer_of
from .registry import ModelRef, Registry

if TYPE_CHECKING:
    from .servicer import ProgsaeServicer

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "api.js": "text/javascript",
                "card.js": "text/javascript", "chart.js": "text/javascript", "tokens.js": "text/javascript",
                "panel.js": "text/javascript", "kl.js": "text/javascript", "style.css": "text/css",
                "favicon.svg": "image/svg+xml"}
CURVE_KEYS = ("g", "fvu", "ce_recovered", "l0")
MAX_LABELS = 1024


class Dashboard:
    """Transport-free data of the dashboard over a Registry (cached by file mtime)."""

    def __init__(self, registry: Registry, max_cards: int = 4):
        self.registry = registry
        self._cards: OrderedDict[Path, tuple[float, Any]] = OrderedDict()
        self._perms: dict[tuple[Path, str], Any] = {}
        self._max = max_cards
        self._lock = threading.Lock()

    def overview(self, resolve: Callable[[str], ModelRef], limits: Any = None) -> dict[str, Any]:
        """Every servable checkpoint (ids resolved by `resolve`, the servicer's) with its curves."""
        out = []
        for name in self.registry.names():
            try:
                spec = resolve(name)
                meta = checkpoint.load_meta(spec.path)
            except (ServiceError, checkpoint.CheckpointError):
                continue
            out.append({"name": name, "default_model_id": spec.id, "architecture": meta.architecture,
                        "d_sae": meta.d_sae, "k": meta.k, "ladder": list(meta.granularities),
                        "language_model": meta.model, "layer": meta.layer,
                        "features": feature_cards.exists(spec.path), "curves": curves(spec.path)})
        lim = {} if limits is None else {"max_text_chars": limits.max_text_chars,
                                         "max_text_tokens": limits.max_text_tokens}
        return {"checkpoints": out, "default_model_id": self.registry.default_id, "limits": lim}

    def feature(self, spec: ModelRef, latent: Any) -> dict[str, Any]:
        try:
            index = int(latent)
        except (TypeError, ValueError):
            raise invalid(f"latent must be an integer, got {latent!r}") from None
        meta = checkpoint.load_meta(spec.path)
        if not 0 <= index < meta.d_sae:
            raise invalid(f"latent {index} out of range 0..{meta.d_sae - 1} for model {spec.id}")
        original = index if spec.ordering == "none" else int(self._perm(spec.path, spec.ordering, meta.d_sae)[index])
        cards = self._load_cards(spec.path, spec.name)
        card = cards.card(original)
        info = cards.info
        return {**card, "label": cards.label(original), "model_id": spec.id, "served_index": index,
                "ordering": spec.ordering,
                "stale": bool(info.get("stale")), "tokens": info.get("tokens"), "top_n": info.get("top_n"),
                "window": info.get("window"), "logit_lens": info.get("logit_lens", False)}

    def labels(self, spec: ModelRef, latents: str) -> dict[str, Any]:
        try:
            wanted = [int(v) for v in latents.split(",") if v.strip()]
        except ValueError:
            raise invalid(f"latents must be comma-separated integers, got {latents[:40]!r}") from None
        if len(wanted) > MAX_LABELS:
            raise invalid(f"at most {MAX_LABELS} latents per call, got {len(wanted)}")
        meta = checkpoint.load_meta(spec.path)
        bad = [i for i in wanted if not 0 <= i < meta.d_sae]
        if bad:
            raise invalid(f"latent {bad[0]} out of range 0..{meta.d_sae - 1} for model {spec.id}")
        perm = None if spec.ordering == "none" else self._perm(spec.path, spec.ordering, meta.d_sae)
        cards = self._load_cards(spec.path, spec.name)
        return {"model_id": spec.id,
                "labels": {str(i): cards.label(i if perm is None else int(perm[i])) for i in wanted}}

    def _perm(self, path: Path, ordering: str, d_sae: int):
        key = (path, ordering)
        if key not in self._perms:
            stored = checkpoint.read_orderings(path, d_sae)
            if ordering not in stored:
                raise not_found(f"checkpoint {path.name} has no ordering {ordering!r}")
            self._perms[key] = stored[ordering].perm
        return self._perms[key]

    def _load_cards(self, path: Path, name: str):
        if not feature_cards.exists(path):
            raise not_found(f"no feature cards for {name!r}; run `progsae features {name} --activations DIR`")
        mtime = (path / feature_cards.INFO).stat().st_mtime
        with self._lock:
            hit = self._cards.get(path)
            if hit is not None and hit[0] == mtime:
                self._cards.move_to_end(path)
                return hit[1]
        try:
            cards = feature_cards.load(path)
        except (OSError, ValueError) as e:
            raise not_found(f"feature cards of {name!r} are unreadable: {e}") from None
        with self._lock:
            self._cards[path] = (mtime, cards)
            while len(self._cards) > self._max:
                self._cards.popitem(last=False)
        return cards


def curves(path: Path) -> dict[str, list[dict[str, Any]]]:
    """{ordering: [{g, fvu, ce_recovered, l0}, ...]} from a checkpoint's metrics.json ({} if none)."""
    f = path / checkpoint.METRICS
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for name, entry in (m.items() if isinstance(m, dict) else ()):
        rungs = entry.get("rungs") if isinstance(entry, dict) else None
        if isinstance(rungs, list) and rungs and all(isinstance(r, dict) and "g" in r for r in rungs):
            out[name] = [{k: r.get(k) for k in CURVE_KEYS} for r in rungs]
    return out


# --- HTTP -------------------------------------------------------------------------------------

router = APIRouter()


def _dashboard(request: Request) -> tuple[ProgsaeServicer, Dashboard]:
    """The servicer this app hosts (http_api.host) and the dashboard data over its registry."""
    sv = servicer_of(request)
    d = getattr(request.app.state, "dashboard", None)
    if d is None or d.registry is not sv.registry:
        d = request.app.state.dashboard = Dashboard(sv.registry)
    return sv, d


def _static(name: str) -> Response:
    if name not in STATIC_FILES or not (STATIC / name).is_file():
        raise not_found(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _static(name)


# Each data route is one servicer call: auth, model resolution, metrics and status mapping are its.

@router.get("/api/overview")
async def overview(request: Request) -> Any:
    sv, d = _dashboard(request)
    call = HttpCall(request.headers)

    async def body():
        return await asyncio.to_thread(d.overview, lambda name: sv.resolve(name, call), sv.service.limits)

    return await sv.unary("Overview", "", call, body, None)


@router.get("/api/feature")
async def feature(request: Request, model_id: str = "", latent: str = "") -> Any:
    sv, d = _dashboard(request)
    call = HttpCall(request.headers)

    async def body():
        return await asyncio.to_thread(d.feature, sv.resolve(model_id, call), latent)

    return await sv.unary("Feature", model_id, call, body, None)


@router.get("/api/labels")
async def labels(request: Request, model_id: str = "", latents: str = "") -> Any:
    sv, d = _dashboard(request)
    call = HttpCall(request.headers)

    async def body():
        return await asyncio.to_thread(d.labels, sv.resolve(model_id, call), latents)

    return await sv.unary("Labels", model_id, call, body, None)
