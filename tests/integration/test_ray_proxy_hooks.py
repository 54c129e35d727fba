"""progsae.server.ray_proxy without a cluster: which Ray errors become UNAVAILABLE, the streaming handler
wrapper cancels what its call left unfinished, and a plain grpc server is registered unchanged. (Through
a real proxy: tests/integration/test_ray_cancel.py and tests/integration/test_ray_node_failure.py.)"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest
from ray import exceptions as rx

from progsae.server import ray_proxy
from progsae.v1 import progsae_pb2_grpc as pb_grpc


@pytest.mark.parametrize("exc", [
    rx.ActorUnavailableError("The actor is temporarily unavailable: RpcError: Socket closed", None),
    rx.ActorDiedError(),
    rx.NodeDiedError("node died"),
    rx.WorkerCrashedError(),
    rx.OwnerDiedError("ab" * 14, None, ""),
    rx.RayTaskError("f", "tb", rx.ActorDiedError()).as_instanceof_cause(),
], ids=lambda e: type(e).__name__)
def test_lost_replica_is_unavailable(exc):
    def stock(exc, *args):
        raise AssertionError("a lost replica must not reach Ray's own mapping")

    status = ray_proxy._lost_replica_is_unavailable(stock, SimpleNamespace)(exc, None, "req")
    assert status.code == grpc.StatusCode.UNAVAILABLE and status.is_error
    assert "\n" not in status.message and "lost" in status.message


@pytest.mark.parametrize("exc", [ValueError("bug"), rx.RayTaskError("f", "tb", KeyError("k")).as_instanceof_cause(),
                                 TimeoutError(), asyncio.CancelledError()], ids=lambda e: type(e).__name__)
def test_other_errors_keep_rays_mapping(exc):
    seen = []
    ray_proxy._lost_replica_is_unavailable(lambda e, *a: seen.append(e) or "ray's", SimpleNamespace)(exc, None, "r")
    assert seen == [exc]


class Response:
    def __init__(self):
        self.was_cancelled = False

    def cancel(self):
        self.was_cancelled = True

    def cancelled(self):
        return self.was_cancelled


class Context:
    def __init__(self):
        self.callbacks = []

    def add_done_callback(self, cb):
        self.callbacks.append(cb)

    def done(self):
        for cb in self.callbacks:
            cb(self)


def test_streaming_handler_cancels_unfinished_responses_when_the_call_is_done():
    """What the proxy opened for a call and did not finish is cancelled when gRPC ends the call (here: the
    client went away after one message, the generator dropped at its yield as grpc.aio does)."""
    base = type("ProxyResponseGenerator", (), {"__init__": lambda self, r: setattr(self, "_response", r)})
    tracked = ray_proxy._tracked(base)
    responses = {}

    def factory(service_method, streaming_type):
        async def unary_stream(request, context):
            finished = tracked(Response())  # done: it completed
            finished._done = True
            running = tracked(Response())  # still streaming from the replica
            responses.update(finished=finished._response, running=running._response)
            yield b"one"
            yield b"two"

        async def unary_unary(request, context):
            return b""

        return unary_stream if streaming_type == "stream" else unary_unary

    wrapped = ray_proxy._cancel_on_done(factory)
    assert asyncio.iscoroutinefunction(wrapped("M", "unary"))  # unary handlers are left as they are
    ctx = Context()

    async def serve_one_message():
        gen = wrapped("progsae.v1.Progsae/StreamDecode", "stream")(b"req", ctx)
        assert await gen.__anext__() == b"one"
        # the client cancels here: grpc.aio drops the generator without resuming it
        ctx.done()

    asyncio.run(serve_one_message())
    assert responses["running"].was_cancelled and not responses["finished"].was_cancelled


def test_plain_grpc_server_registers_unchanged():
    server = grpc.server(ThreadPoolExecutor(1))
    ray_proxy.add_ProgsaeServicer_to_server(pb_grpc.ProgsaeServicer(), server)  # no service_handler_factory
    server.stop(0)
    assert ray_proxy.install() in (True, False)  # outside a Serve proxy process: nothing to patch
