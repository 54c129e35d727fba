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
                                   the tokens its top contexts peak on, else its top promoted
                                   tokens), `latent` in the served order as above
Errors answer {"code", "message"} with the matching HTTP status, like the rest of the API.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from progsae.sae import checkpoint, feature_cards

from .errors import ServiceError, invalid, not_found
from .registry import Registry

if TYPE_CHECKING:
    from .service import CodecService

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "api.js": "text/javascript",
                "card.js": "text/javascript", "chart.js": "text/javascript", "style.css": "text/css",
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

    def overview(self, limits: Any = None) -> dict[str, Any]:
        out = []
        for name in self.registry.names():
            try:
                spec = self.registry.resolve(name)
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

    def feature(self, model_id: str, latent: Any) -> dict[str, Any]:
        try:
            index = int(latent)
        except (TypeError, ValueError):
            raise invalid(f"latent must be an integer, got {latent!r}") from None
        spec = self.registry.resolve(model_id)
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

    def labels(self, model_id: str, latents: str) -> dict[str, Any]:
        try:
            wanted = [int(v) for v in latents.split(",") if v.strip()]
        except ValueError:
            raise invalid(f"latents must be comma-separated integers, got {latents[:40]!r}") from None
        if len(wanted) > MAX_LABELS:
            raise invalid(f"at most {MAX_LABELS} latents per call, got {len(wanted)}")
        spec = self.registry.resolve(model_id)
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


class _Replica(Protocol):
    """What the dashboard routes use of the replica that serves them (an app.Codec)."""

    registry: Registry
    service: CodecService
    _dashboard: Dashboard


def _codec() -> _Replica:
    from ray import serve

    # Serve annotates servable_object as a plain callable; it is the ingress deployment's instance.
    return cast(_Replica, serve.get_replica_context().servable_object)


def _dashboard() -> Dashboard:
    c = _codec()
    d = getattr(c, "_dashboard", None)
    if d is None:
        d = c._dashboard = Dashboard(c.registry)
    return d


def _error(e: Exception) -> JSONResponse:
    if not isinstance(e, ServiceError):
        from .errors import internal

        e = internal(e)
    return JSONResponse({"code": e.status.value, "message": e.message}, status_code=e.status.http)


def _static(name: str) -> Response:
    if name not in STATIC_FILES or not (STATIC / name).is_file():
        return _error(not_found(f"no static file {name!r}"))
    return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def page() -> Response:
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    return _static(name)


@router.get("/api/overview")
async def overview() -> Any:
    try:
        return _dashboard().overview(_codec().service.limits)
    except Exception as e:  # noqa: BLE001
        return _error(e)


@router.get("/api/feature")
async def feature(model_id: str = "", latent: str = "") -> Any:
    try:
        return _dashboard().feature(model_id, latent)
    except Exception as e:  # noqa: BLE001
        return _error(e)


@router.get("/api/labels")
async def labels(model_id: str = "", latents: str = "") -> Any:
    try:
        return _dashboard().labels(model_id, latents)
    except Exception as e:  # noqa: BLE001
        return _error(e)
