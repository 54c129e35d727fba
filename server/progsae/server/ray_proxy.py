"""What progsae adds to Ray Serve's gRPC proxy: lost replicas answer UNAVAILABLE, and a client's cancel
reaches the replica.

Serve's proxy takes no interceptors. The one piece of our code it runs is the servicer-registration
function named in `grpc_options.grpc_servicer_functions`; listing `add_ProgsaeServicer_to_server` from
this module there (deploy/serve_config.yaml, `launch.start`) installs two fixes in the proxy process,
then registers the service as the generated function does:

* **Status of a lost replica.** When the replica (or its node) dies while it serves a call, the proxy
  gets a Ray error (`ActorDiedError`, `ActorUnavailableError` "... Socket closed", `NodeDiedError`,
  `WorkerCrashedError`, a lost object) and Ray answers INTERNAL with Ray's multi-line message. The call
  never reached a bug of ours: the service is briefly short of a replica, which is what UNAVAILABLE
  means, and clients retry UNAVAILABLE. Measured on a two-node cluster whose worker raylet was killed
  under streaming load (tests/integration/test_ray_node_failure.py, RELIABILITY.md): before, in-flight calls ended
  INTERNAL; now UNAVAILABLE, one line.
* **Client cancel of a stream.** grpc.aio cancels a server-streaming handler's task when the client
  cancels or its deadline passes. If that task is parked inside the proxy's await on the replica,
  Serve cancels the replica's request. If it is parked at the handler's `yield` (the proxy handing a
  message to gRPC), the handler's generator is dropped instead: it is closed later with GeneratorExit
  at `yield result` in `gRPCProxy.send_request_to_replica`, which Serve logs as "Request failed due to
  unexpected error" and which never cancels the replica's request, so the replica computes the whole
  stream. Measured with a stock proxy: 1 of 10 cancels (fast rungs) and 1 of 5 (slow rungs) were lost
  that way. Here every streaming call registers the responses it opened and cancels the unfinished
  ones when gRPC reports the call done (`ServicerContext.add_done_callback`), so a cancel or an expired
  deadline always reaches the replica, which then stops within one rung (tests/integration/test_ray_cancel.py).

Both are guarded: with a Ray whose proxy lacks what they hook (`ray.serve._private.proxy`'s
`get_grpc_response_status` and `ProxyResponseGenerator`), they log a warning and the service is
registered unchanged. The plain grpcio server and the replica's own port need neither.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

import grpc

from progsae.v1 import progsae_pb2_grpc as pb_grpc

log = logging.getLogger("progsae.server")

PROXY_MODULE = "ray.serve._private.proxy"
LOST_REPLICA = "the replica serving the call was lost ({}); retry the call"
"""One-line message of the UNAVAILABLE that replaces Ray's INTERNAL for a lost replica."""

_responses: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("progsae_proxy_responses",
                                                                              default=None)
"""The proxy responses opened by the current streaming call (set per call, in its own task's context)."""


def lost_replica_errors() -> tuple[type[BaseException], ...]:
    """Ray errors that mean the replica (its worker, its node, or a result it held) is gone."""
    from ray import exceptions as rx

    names = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "ObjectLostError",
             "OutOfMemoryError")
    return tuple(getattr(rx, n) for n in names if isinstance(getattr(rx, n, None), type))


def is_lost_replica(exc: BaseException) -> bool:
    """True for a lost-replica Ray error, also when wrapped in a RayTaskError (its `cause`)."""
    kinds = lost_replica_errors()
    return isinstance(exc, kinds) or isinstance(getattr(exc, "cause", None), kinds)


def add_ProgsaeServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802  (grpc's naming)
    """`progsae_pb2_grpc.add_ProgsaeServicer_to_server`, plus the proxy fixes above when `server` is
    Serve's proxy server (it routes every method through its `service_handler_factory`)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or not install():
        pb_grpc.add_ProgsaeServicer_to_server(servicer, server)
        return
    server.service_handler_factory = _cancel_on_done(factory)
    try:
        pb_grpc.add_ProgsaeServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory


def install() -> bool:
    """Patch the proxy module (once per process); False when this Ray's proxy lacks the hooks."""
    proxy: Any = sys.modules.get(PROXY_MODULE)  # Any: we set attributes the module does not declare
    if proxy is None:
        return False  # not in a Serve proxy process
    if getattr(proxy, "_progsae_installed", False):
        return True
    status = getattr(proxy, "get_grpc_response_status", None)
    generator = getattr(proxy, "ProxyResponseGenerator", None)
    try:
        from ray.serve._private.proxy_request_response import ResponseStatus
    except ImportError:
        ResponseStatus = None  # noqa: N806
    if not callable(status) or not isinstance(generator, type) or ResponseStatus is None:
        log.warning("progsae: this Ray's gRPC proxy lacks the hooks progsae patches; lost replicas answer "
                    "INTERNAL and client cancels may not reach replicas")
        return False
    proxy.get_grpc_response_status = _lost_replica_is_unavailable(status, ResponseStatus)
    proxy.ProxyResponseGenerator = _tracked(generator)
    proxy._progsae_installed = True
    return True


def _lost_replica_is_unavailable(status: Callable[..., Any], response_status: Callable[..., Any]):
    def get_grpc_response_status(exc: BaseException, *args: Any, **kwargs: Any) -> Any:
        if is_lost_replica(exc):
            log.warning("progsae: call failed on a lost replica, answering UNAVAILABLE: %s",
                        " ".join(str(exc).split())[:500])
            return response_status(code=grpc.StatusCode.UNAVAILABLE, is_error=True,
                                   message=LOST_REPLICA.format(type(exc).__name__))
        return status(exc, *args, **kwargs)

    return get_grpc_response_status


def _tracked(base: type) -> type:
    class TrackedProxyResponseGenerator(base):  # type: ignore[misc, valid-type]
        """Ray's ProxyResponseGenerator, registered with the streaming call that opened it (if any)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened = _responses.get()
            if opened is not None:
                opened.append(self)

    return TrackedProxyResponseGenerator


def _cancel_unfinished(opened: list[Any]) -> None:
    for gen in opened:
        response = getattr(gen, "_response", None)
        if response is None or getattr(gen, "_done", False) or response.cancelled():
            continue
        try:
            response.cancel()
        except Exception:  # noqa: BLE001  (best effort, like Serve's own cancel)
            log.warning("progsae: cancelling a replica request failed", exc_info=True)


def _cancel_on_done(factory: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the proxy's handler factory: streaming handlers cancel their unfinished replica responses
    when gRPC reports the call done (finished, cancelled by the client, or past its deadline)."""

    def service_handler_factory(*args: Any, **kwargs: Any) -> Any:
        handler = factory(*args, **kwargs)
        if not inspect.isasyncgenfunction(handler):
            return handler  # unary: a cancel reaches it inside the proxy's await, which Serve handles

        async def streaming(request: Any, context: Any):
            opened: list[Any] = []
            _responses.set(opened)
            context.add_done_callback(lambda _ctx: _cancel_unfinished(opened))
            async for message in handler(request, context):
                yield message

        return streaming

    return service_handler_factory
