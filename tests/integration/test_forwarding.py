"""A replica-port call whose forwarding Serve's router never places is served where it landed
(progsae.server.placement.HandleForwarder), over real gRPC on loopback. The handle here stands in for a
DeploymentHandle whose router does not know the deployment's replicas yet (a fresh replica), the case
that made forwarded calls hang; the node-death case runs on a real cluster in test_ray_node_failure.py."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from progsae.clients import Client
from progsae.server.grpc_server import PlainServer
from progsae.server.placement import HandleForwarder
from progsae.server.registry import RegistryConfig
from tests.support import synthetic as testing

D, M = 16, 512


class NeverPlaced:
    """A DeploymentHandle call that Serve's router never assigns to a replica."""

    def __init__(self) -> None:
        self.cancelled = False

    def options(self, **_: Any) -> NeverPlaced:
        return self

    def __getattr__(self, method: str) -> NeverPlaced:
        return self

    def remote(self, *_: Any) -> NeverPlaced:
        return self

    async def _to_object_ref(self) -> Any:
        await asyncio.Event().wait()

    _to_object_ref_gen = _to_object_ref

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    for method in ("encode", "stream"):  # one model per test, not loaded before it
        testing.make_checkpoint(root / method, d=D, m=M, k=8, orderings=False, seed=1)
    with PlainServer(RegistryConfig(root=str(root))) as s:
        yield s


@pytest.mark.parametrize("method", ["encode", "stream"])
def test_an_unplaced_forward_is_served_here(server, method):
    handle = NeverPlaced()
    server.servicer.forward = HandleForwarder(lambda: handle, server.registry.loaded, need=lambda spec: 1,
                                              budget=0, wait_s=0.3)  # budget 0: every unheld model is sent on
    x = testing.sample_activations(8, d=D, m=M).numpy()
    with Client(server.address, timeout=10, retries=0) as c:
        before = c.stats().work
        if method == "encode":
            got = c.decode_at(c.encode(x, model=method), M).reconstruction
        else:
            got = list(c.stream(x, model=method, payload="reconstruction"))[-1].tensor
        work = c.stats().work
        want = c.decode_at(c.encode(x, model=method), M).reconstruction  # held here now: not forwarded
    assert handle.cancelled  # the router's pending placement was withdrawn
    assert work["forward unrouted"] == before["forward unrouted"] + 1 and work["forward"] == before["forward"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # a stream sums rung deltas
    server.servicer.forward = None
