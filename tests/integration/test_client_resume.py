"""The clients' retry rules against a scripted server: a stream cut part-way by a lost replica is resumed
(its delivered rungs checked and skipped, each rung handed over once), a replay that differs is not,
Ray's words for a lost replica count as UNAVAILABLE, and a real INTERNAL is never retried."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from progsae.clients import Client, ProgsaeError
from progsae.clients.aio import AsyncClient
from progsae.clients.client import status_of
from progsae.clients.types import StreamResult
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc

LADDER = [8, 16, 32, 64]
RAY_LOST = ("The actor 479e9e5b4e72e1d84fce4ecd01000000 is unavailable: The actor is temporarily unavailable: "
            "RpcError: RPC error: Socket closed rpc_code: 14. The task may or may not have been executed on the actor.")


def messages(ladder=LADDER, upto: int | None = None, stop=pb.STOP_REASON_LADDER_DONE, model="m@none"):
    """A stream's messages: header on the first, one rung each, end on the rung `upto` (default: last)."""
    upto = len(ladder) - 1 if upto is None else upto
    out = []
    for i, g in enumerate(ladder[: upto + 1]):
        msg = pb.StreamDecodeResponse(rung=pb.Rung(index=i, g=g, mean_l0=float(i), elapsed_ms=1.0))
        if i == 0:
            msg.header.CopyFrom(pb.StreamHeader(model_id=model, tokens=2, ladder=ladder))
        if i == upto:
            msg.end.CopyFrom(pb.StreamEnd(stop_reason=stop, rungs=i + 1, final_g=g))
        out.append(msg)
    return out


@dataclass
class Attempt:
    send: list
    abort: tuple[grpc.StatusCode, str] | None = None


@dataclass
class Script(pb_grpc.ProgsaeServicer):
    attempts: list[Attempt] = field(default_factory=list)
    requests: list = field(default_factory=list)
    encodes: int = 0

    def StreamDecode(self, request, context):
        self.requests.append(request)
        a = self.attempts.pop(0)
        yield from a.send
        if a.abort:
            context.abort(*a.abort)

    def Encode(self, request, context):
        self.encodes += 1
        context.abort(grpc.StatusCode.INTERNAL, "internal error (ValueError); details are in the server log")


@pytest.fixture
def server():
    script = Script()
    srv = grpc.server(ThreadPoolExecutor(4))
    pb_grpc.add_ProgsaeServicer_to_server(script, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield script, f"127.0.0.1:{port}"
    srv.stop(0)


X = np.zeros((2, 4), np.float32)
LOST = (grpc.StatusCode.UNAVAILABLE, "the replica serving the call was lost (ActorUnavailableError); retry the call")


def _stream(target, **kw):
    with Client(target, backoff=0.01) as c:
        s = c.stream(X, model="m", **kw)
        rungs = list(s)
    return s, rungs


@pytest.mark.parametrize("abort", [LOST, (grpc.StatusCode.INTERNAL, RAY_LOST)], ids=["UNAVAILABLE", "Ray INTERNAL"])
def test_stream_cut_part_way_is_resumed(server, abort):
    script, target = server
    script.attempts = [Attempt(messages()[:2], abort), Attempt(messages())]
    s, rungs = _stream(target)
    assert [(r.index, r.g) for r in rungs] == list(enumerate(LADDER))  # each rung once, in order
    assert s.result.stop_reason == "ladder_done" and s.result.rungs == 4 and s.resumed == 1
    assert len(script.requests) == 2


NO_REPLICA = (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: connection refused")


def test_resume_after_a_call_that_reached_no_replica_and_one_lost_replica(server):
    script, target = server
    script.attempts = [Attempt([], NO_REPLICA), Attempt([], NO_REPLICA), Attempt(messages()[:1], LOST),
                       Attempt(messages())]
    s, rungs = _stream(target)
    assert [r.g for r in rungs] == LADDER and s.resumed == 1 and len(script.requests) == 4


def test_a_call_whose_replica_died_twice_is_not_retried_again(server):
    """A request that kills its replica (out of memory, a crash) costs at most two replicas, not retries + 1."""
    script, target = server
    script.attempts = [Attempt(messages()[:1], LOST), Attempt(messages()[:3], LOST), Attempt(messages())]
    with Client(target, backoff=0.01) as c:
        s = c.stream(X, model="m")
        got = []
        with pytest.raises(ProgsaeError) as e:
            for r in s:
                got.append(r.g)
    assert got == LADDER[:3] and len(script.requests) == 2
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "replica serving the call was lost" in e.value.details


def test_resumed_stream_keeps_its_deadline_budget(server):
    """The retry's deadline_ms is the budget left; if it stops earlier than the cut, the rungs delivered
    stay the result."""
    script, target = server
    script.attempts = [Attempt(messages()[:3], LOST), Attempt(messages(upto=0, stop=pb.STOP_REASON_DEADLINE))]
    s, rungs = _stream(target, deadline_ms=60_000)
    assert [r.g for r in rungs] == LADDER[:3]
    assert s.result.stop_reason == "deadline" and s.result.rungs == 3 and s.result.final_g == LADDER[2]
    first, retry = script.requests
    assert first.budget.deadline_ms == 60_000 and 1 <= retry.budget.deadline_ms < 60_000


@pytest.mark.parametrize("replay", [
    messages(ladder=[8, 16, 32, 128]),  # another ladder in the header
    messages(model="other@none"),
    [messages()[0]] + [pb.StreamDecodeResponse(rung=pb.Rung(index=1, g=16, mean_l0=7.0))],  # rung 1 differs
    [pb.StreamDecodeResponse(rung=pb.Rung(index=0, g=8))],  # no header
], ids=["ladder", "model", "rung", "no header"])
def test_a_replay_that_differs_is_not_resumed(server, replay):
    script, target = server
    script.attempts = [Attempt(messages()[:2], LOST), Attempt(replay)]
    with Client(target, backoff=0.01) as c:
        s = c.stream(X, model="m")
        got = []
        with pytest.raises(ProgsaeError) as e:
            for r in s:
                got.append(r.g)
    assert got == LADDER[:2]
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "not resumed" in e.value.details


def test_real_internal_is_not_retried(server):
    script, target = server
    script.attempts = [Attempt(messages()[:2], (grpc.StatusCode.INTERNAL, "internal error (KeyError)"))]
    with pytest.raises(ProgsaeError) as e:
        _stream(target)
    assert e.value.code == grpc.StatusCode.INTERNAL and len(script.requests) == 1
    with Client(target, backoff=0.01) as c, pytest.raises(ProgsaeError) as e:
        c.encode(X, model="m")
    assert e.value.code == grpc.StatusCode.INTERNAL and script.encodes == 1


def test_async_client_resumes_too(server):
    script, target = server
    script.attempts = [Attempt(messages()[:2], (grpc.StatusCode.INTERNAL, RAY_LOST)), Attempt(messages())]

    async def run():
        async with AsyncClient(target, backoff=0.01) as c:
            result = StreamResult()
            return [r.g async for r in c.stream(X, model="m", result=result)], result

    gs, result = asyncio.run(run())
    assert gs == LADDER and result.rungs == 4 and len(script.requests) == 2


@pytest.mark.parametrize("details", [
    RAY_LOST,
    "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
    "The actor died because its node has died. Node Id: 3f2a",
    "ray.exceptions.NodeDiedError: Task failed because the node it ran on died",
    "ray.exceptions.WorkerCrashedError: The worker died unexpectedly while executing this task.",
])
def test_ray_words_for_a_lost_replica_are_unavailable(details):
    class E(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.INTERNAL

        def details(self):
            return details

    code, msg = status_of(E())
    assert code == grpc.StatusCode.UNAVAILABLE and "\n" not in msg


def test_resumed_per_token_delta_stream_adds_each_rung_once(server):
    """A per-token stream's rows are summed into `result.reconstruction` once per rung, however often the
    resumed stream replays it."""
    from progsae.v1 import convert

    def per_token_messages():
        rows = [([0, 1], 1.0, 1), ([1], 2.0, 1), ([1], 3.0, 0)]
        out = []
        for i, (tokens, v, refining) in enumerate(rows):
            r = pb.Rung(index=i, g=LADDER[i], mean_l0=float(i), tokens=tokens, refining=refining,
                        tensor=convert.from_numpy(np.full((len(tokens), 4), v, np.float32)))
            msg = pb.StreamDecodeResponse(rung=r)
            if i == 0:
                msg.header.CopyFrom(pb.StreamHeader(model_id="m@none", tokens=2, ladder=LADDER,
                                                    payload=pb.PAYLOAD_DELTA))
            out.append(msg)
        out[-1].end.CopyFrom(pb.StreamEnd(stop_reason=pb.STOP_REASON_TOKEN_TARGET_FVU, rungs=3, final_g=32,
                                          token_final_g=[8, 32], token_met=[True, True]))
        return out

    script, target = server
    script.attempts = [Attempt(per_token_messages()[:2], LOST), Attempt(per_token_messages())]
    s, rungs = _stream(target, token_target_fvu=0.5, payload="delta")
    assert [r.index for r in rungs] == [0, 1, 2] and s.resumed == 1
    assert s.result.reconstruction is not None
    np.testing.assert_array_equal(s.result.reconstruction, [[1.0] * 4, [6.0] * 4])
    assert list(s.result.token_final_g) == [8, 32] and s.result.token_met.all()
    assert s.result.stop_reason == "token_target_fvu"
    assert script.requests[0].budget.token_target_fvu == 0.5


def test_retry_policy_of_every_call():
    """UNAVAILABLE that reached no replica: up to `retries` with doubling backoff; a lost replica: once."""
    from progsae.clients.client import ClientConfig, Retries

    r = Retries(ClientConfig(retries=3, backoff=0.5))
    u = grpc.StatusCode.UNAVAILABLE
    assert [r.again(u, NO_REPLICA[1]) for _ in range(4)] == [0.5, 1.0, 2.0, None]
    r = Retries(ClientConfig(retries=3, backoff=0.5))
    assert r.again(u, LOST[1]) == 0.5 and r.again(u, NO_REPLICA[1]) == 1.0 and r.again(u, "Socket closed") is None
    assert Retries(ClientConfig()).again(grpc.StatusCode.INTERNAL, "internal error (KeyError)") is None
