"""Bad-input fuzz (hypothesis) over every RPC's fields, against the plain grpcio server on a socket.

Every call must end OK or with a documented status, carry a one-line message with no traceback,
path or internal detail, and leave the server serving: a good call right after succeeds.
After each test the server has counted no INTERNAL, and the test made at least half its example
budget of calls per RPC. The cases and outcomes per RPC are printed in the session's summary
(tests/conftest.py; RELIABILITY.md quotes them).
"""

from __future__ import annotations

import collections
import math

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progsae.server.grpc_server import PlainServer
from progsae.server.registry import RegistryConfig
from progsae.server.service import ServiceConfig
from progsae.server.validate import Limits
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing

D, M = 8, 64
LIMITS = Limits(max_request_bytes=32 * 1024, max_response_bytes=16 * 1024, max_tokens=128, max_rungs=64,
                max_text_chars=200, max_text_tokens=16)
DOCUMENTED = {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "FAILED_PRECONDITION"}
ALLOWED = {
    "Encode": DOCUMENTED, "DecodeAtGranularity": DOCUMENTED, "StreamDecode": DOCUMENTED,
    "EncodeText": DOCUMENTED | {"UNIMPLEMENTED"}, "GetModel": DOCUMENTED, "ListModels": DOCUMENTED,
    "GetServerStats": DOCUMENTED,
}
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
INT64 = st.one_of(st.integers(-3, M + 3), st.integers(-(2 ** 63), 2 ** 63 - 1),
                  st.sampled_from([0, 1, M, M + 1, -1, 2 ** 31, 2 ** 63 - 1, -(2 ** 63)]))
ENUM = st.one_of(st.integers(0, 4), st.integers(-(2 ** 31), 2 ** 31 - 1))
F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
MODE = st.one_of(st.sampled_from([0, 0, 1]), ENUM)
G = st.one_of(st.integers(1, M), INT64)
DTYPE = st.one_of(st.sampled_from([0, 1, 2, 3, 4]), ENUM)
PAYLOAD = st.one_of(st.sampled_from([0, 1, 2]), ENUM)
MODEL_IDS = st.one_of(
    st.sampled_from(["", "topk", "topk@none", "topk@mean_sq", "topk@freq", "mat", "mat@none"]),
    st.sampled_from(["nope", "topk@nope", "../topk", "/etc/passwd", "topk/../..", "topk/../../etc", "a//b",
                     "topk@../x", ".", "..", "./topk", "%2e%2e/topk", "topk\x00", "topk\\..\\x", "x" * 300,
                     "~root", "topk@", "@mean_sq", "topk/cfg.json", " topk"]),
    st.text(max_size=40),
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("fuzzckpt")
    testing.make_checkpoint(r / "topk", d=D, m=M, k=4, model=None)
    testing.make_checkpoint(r / "mat", d=D, m=M, k=4, architecture="matryoshka", orderings=False, model=None)
    return r


@pytest.fixture(scope="module")
def server(root):
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS)) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    ch = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 1 << 26),
                                                        ("grpc.max_receive_message_length", 1 << 26)])
    yield pb_grpc.ProgsaeStub(ch)
    ch.close()


GOOD_X = testing.sample_activations(4, d=D, m=M).numpy()


def clean_message(details: str, root) -> None:
    assert "\n" not in details and "Traceback" not in details, details
    assert str(root) not in details and "site-packages" not in details and 'File "' not in details, details
    assert len(details) < 400, details


class Tally:
    """The calls of one fuzz test: cases per RPC and outcomes per RPC and status."""

    def __init__(self) -> None:
        self.cases: collections.Counter[str] = collections.Counter()
        self.outcomes: collections.Counter[str] = collections.Counter()


def call(tally: Tally, stub, root, rpc: str, req, timeout: float = 20.0, metadata=None) -> grpc.StatusCode:
    """One call, its status checked; after a failure a good call must succeed."""
    tally.cases[rpc] += 1
    try:
        out = getattr(stub, rpc)(req, timeout=timeout, metadata=metadata)
        if rpc == "StreamDecode":
            msgs = list(out)
            assert msgs and msgs[0].HasField("header") and msgs[-1].HasField("end")
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert code.name in ALLOWED[rpc], (rpc, code, e.details())
        clean_message(e.details() or "", root)
    tally.outcomes[f"{rpc}:{code.name}"] += 1
    if code != grpc.StatusCode.OK:
        good = stub.Encode(pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(GOOD_X)), timeout=20)
        assert len(good.codes.offsets) == GOOD_X.shape[0] + 1
    return code


def settle(tally: Tally, stub, fuzz_cases, minimum: dict[str, int]) -> None:
    """End of a fuzz test: its tally goes to the report; the server answers and has counted no
    INTERNAL (also none that the client saw as a deadline or cancel); each RPC got its cases."""
    fuzz_cases["rpc cases"].update(tally.cases)
    fuzz_cases["rpc outcomes"].update(tally.outcomes)
    stats = stub.GetServerStats(pb.ServerStatsRequest(), timeout=10)
    assert not any(k.endswith(":INTERNAL") for k in stats.requests), dict(stats.requests)
    for rpc, n in minimum.items():
        assert tally.cases[rpc] >= n, (rpc, dict(tally.cases))


# --- strategies ---------------------------------------------------------------------------------------------


@st.composite
def tensors(draw) -> pb.Tensor:
    kind = draw(st.sampled_from(["consistent", "consistent", "random"]))
    if kind == "random":
        return pb.Tensor(data=draw(st.binary(max_size=512)), shape=draw(st.lists(INT64, max_size=4)),
                         dtype=draw(ENUM))
    n = draw(st.one_of(st.integers(0, 6), st.sampled_from([LIMITS.max_tokens, LIMITS.max_tokens + 1])))
    d = draw(st.sampled_from([D, D, D, D - 1, D + 1, 1]))
    dtype = draw(st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64,
                                  pb.DTYPE_UNSPECIFIED]))
    special = draw(st.one_of(st.just([]), st.lists(st.sampled_from(
        [math.nan, math.inf, -math.inf, 1e38, -1e38, 1e300, 0.0, -0.0, 1e-45]), max_size=3)))
    a = GOOD_X[np.arange(n) % 4, :][:, :d] if d <= D else np.ones((n, d), np.float32)
    a = a.astype(np.float64)
    for j, v in enumerate(special):
        if a.size:
            a.flat[(7 * j) % a.size] = v
    np_dtype = {pb.DTYPE_FLOAT16: np.float16, pb.DTYPE_FLOAT64: np.float64}.get(dtype, np.float32)
    with np.errstate(over="ignore"):
        data = a.astype(np_dtype)
    if dtype == pb.DTYPE_BFLOAT16:
        data = (data.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    raw = data.tobytes()
    cut = draw(st.sampled_from([0, 0, 0, 0, 0, 1, -1, 3]))
    raw = raw[:len(raw) - cut] if cut > 0 else raw + b"\0" * -cut
    keep = draw(st.sampled_from([True, True, True, False])) or n == 0
    shape = [n, d] if keep else draw(st.sampled_from([[n * d], [n, d, 1], [d, n]]))
    return pb.Tensor(data=raw, shape=shape, dtype=dtype)


@st.composite
def codes(draw) -> pb.SparseCodes:
    kind = draw(st.sampled_from(["consistent", "consistent", "random"]))
    if kind == "random":
        return pb.SparseCodes(offsets=draw(st.lists(INT64, max_size=8)), indices=draw(st.lists(INT64, max_size=16)),
                              values=draw(st.lists(F32, max_size=16)))
    n = draw(st.integers(0, 5))
    rows = [draw(st.lists(st.integers(0, M - 1), max_size=5, unique=True)) for _ in range(n)]
    per = [len(r) for r in rows]
    offsets = [0, *np.cumsum(per).tolist()] if n else [0]
    total = offsets[-1]
    idx = [i for r in rows for i in r]
    vals = draw(st.lists(st.floats(0, 10, width=32), min_size=total, max_size=total))
    mutate = draw(st.sampled_from(["none", "none", "none", "offsets", "drop_value", "extra_index", "dup",
                                   "bad_index", "bad_value"]))
    if mutate == "bad_index" and idx:
        idx[draw(st.integers(0, len(idx) - 1))] = draw(st.one_of(st.integers(-2, M + 2), INT64))
    elif mutate == "bad_value" and vals:
        vals[draw(st.integers(0, len(vals) - 1))] = draw(F32)
    if mutate == "offsets" and offsets:
        offsets[draw(st.integers(0, len(offsets) - 1))] = draw(INT64)
    elif mutate == "drop_value" and vals:
        vals.pop()
    elif mutate == "extra_index":
        idx.append(draw(INT64))
    elif mutate == "dup" and len(idx) >= 2 and per and per[0] >= 2:
        idx[1] = idx[0]
    return pb.SparseCodes(offsets=offsets, indices=idx, values=vals)


def timeouts():
    return st.one_of(st.just(20.0), st.just(20.0), st.just(20.0), st.floats(0.0005, 0.05))


def metadatas():
    return st.one_of(st.just(None), st.lists(st.tuples(st.sampled_from(["multiplexed_model_id", "x-junk"]),
                                                       MODEL_IDS.filter(_md_ok)), max_size=2))


def _md_ok(v: str) -> bool:
    return all(32 <= ord(c) < 127 for c in v) and v == v.strip()  # gRPC metadata values: printable ASCII


# --- the fuzz tests ------------------------------------------------------------------------------------------


def test_fuzz_encode(stub, root, fuzz_cases):
    tally = Tally()

    @settings(FUZZ, max_examples=200)
    @given(model=MODEL_IDS, t=st.one_of(tensors(), st.none()), mode=MODE, g=st.one_of(st.just(0), G),
           timeout=timeouts(), md=metadatas())
    def case(model, t, mode, g, timeout, md):
        req = pb.EncodeRequest(model_id=model, mode=mode, granularity=g)
        if t is not None:
            req.activations.CopyFrom(t)
        call(tally, stub, root, "Encode", req, timeout, md)

    case()
    settle(tally, stub, fuzz_cases, {"Encode": 100})


def test_fuzz_decode(stub, root, fuzz_cases):
    tally = Tally()

    @settings(FUZZ, max_examples=200)
    @given(model=MODEL_IDS, c=st.one_of(codes(), st.none()), g=G, dtype=DTYPE, timeout=timeouts())
    def case(model, c, g, dtype, timeout):
        req = pb.DecodeRequest(model_id=model, granularity=g, output_dtype=dtype)
        if c is not None:
            req.codes.CopyFrom(c)
        call(tally, stub, root, "DecodeAtGranularity", req, timeout)

    case()
    settle(tally, stub, fuzz_cases, {"DecodeAtGranularity": 100})


@st.composite
def budgets(draw) -> pb.Budget:
    b = pb.Budget()
    if draw(st.booleans()):
        b.max_granularity = draw(G)
    if draw(st.booleans()):
        b.deadline_ms = draw(st.one_of(INT64, st.integers(1, 5)))
    if draw(st.booleans()):
        b.target_fvu = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1.5)))
    if draw(st.booleans()):  # revision 3
        b.token_target_fvu = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1.5)))
    if draw(st.booleans()):
        b.max_k = draw(st.one_of(st.integers(0, 6), INT64))
    if draw(st.integers(0, 3)) == 0:  # revision 5
        b.token_target_kl = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 5)))
    return b


FIDELITY = st.builds(pb.Fidelity, kl=st.booleans(), predictions=st.one_of(st.integers(0, 21), ENUM))


AXIS = st.sampled_from([pb.STREAM_AXIS_G, pb.STREAM_AXIS_K, 2, -1])
K_LADDERS = st.one_of(st.just([]), st.lists(st.integers(-1, 6), max_size=5), st.lists(INT64, max_size=3))


@st.composite
def ladders(draw) -> list[int]:
    kind = draw(st.sampled_from(["empty", "empty", "valid", "valid", "random", "long"]))
    if kind == "empty":
        return []
    if kind == "valid":
        return sorted(draw(st.sets(st.integers(1, M), min_size=1, max_size=8)))
    if kind == "long":
        return list(range(1, LIMITS.max_rungs + 2))
    return draw(st.lists(INT64, max_size=10))


def test_fuzz_stream(stub, root, fuzz_cases):
    tally = Tally()

    @settings(FUZZ, max_examples=200)
    @given(model=MODEL_IDS, which=st.sampled_from(["activations", "codes", "none", "text"]), t=tensors(), c=codes(),
           budget=budgets(), payload=PAYLOAD, ladder=ladders(), dtype=DTYPE, per_token=st.booleans(),
           timeout=timeouts(), axis=AXIS, k_ladder=K_LADDERS, fidelity=st.one_of(st.none(), FIDELITY),
           text=st.text(max_size=64))
    def case(model, which, t, c, budget, payload, ladder, dtype, per_token, timeout, axis, k_ladder, fidelity,
             text):
        req = pb.StreamDecodeRequest(model_id=model, budget=budget, payload=payload, ladder=ladder,
                                     output_dtype=dtype, per_token_l0=per_token, axis=axis, k_ladder=k_ladder,
                                     fidelity=fidelity)
        if which == "activations":
            req.activations.CopyFrom(t)
        elif which == "codes":
            req.codes.CopyFrom(c)
        elif which == "text":  # these checkpoints name no language model: refused, never INTERNAL
            req.text.text = text
        call(tally, stub, root, "StreamDecode", req, timeout)

    case()
    settle(tally, stub, fuzz_cases, {"StreamDecode": 100})


def test_fuzz_encode_text(stub, root, fuzz_cases):
    tally = Tally()

    @settings(FUZZ, max_examples=60)
    @given(model=MODEL_IDS, text=st.one_of(st.text(max_size=64), st.just("x" * (LIMITS.max_text_chars + 1))),
           n=st.integers(-(2 ** 31), 2 ** 31 - 1))
    def case(model, text, n):
        call(tally, stub, root, "EncodeText", pb.EncodeTextRequest(model_id=model, text=text, max_tokens=n))

    case()
    settle(tally, stub, fuzz_cases, {"EncodeText": 30})


def test_fuzz_model_ids(stub, root, fuzz_cases):
    """GetModel over arbitrary ids: traversal, absolute, NUL, unicode, overlong; never a file outside root."""
    tally = Tally()

    @settings(FUZZ, max_examples=100)
    @given(model=MODEL_IDS, md=metadatas())
    def case(model, md):
        code = call(tally, stub, root, "GetModel", pb.GetModelRequest(model_id=model), metadata=md)
        if code == grpc.StatusCode.OK:
            assert model.partition("@")[0] in ("", "topk", "mat") or md, model

    case()
    settle(tally, stub, fuzz_cases, {"GetModel": 50})


def test_fuzz_list_and_stats(stub, root, fuzz_cases):
    tally = Tally()

    @settings(FUZZ, max_examples=20)
    @given(md=metadatas())
    def case(md):
        call(tally, stub, root, "ListModels", pb.ListModelsRequest(), metadata=md)
        call(tally, stub, root, "GetServerStats", pb.ServerStatsRequest(), metadata=md)

    case()
    settle(tally, stub, fuzz_cases, {"ListModels": 10, "GetServerStats": 10})


def _good_requests() -> dict[str, object]:
    enc = pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(GOOD_X))
    c = convert.codes_from_arrays(np.tile(np.arange(4), (4, 1)), np.ones((4, 4), np.float32))
    return {
        "Encode": enc,
        "DecodeAtGranularity": pb.DecodeRequest(model_id="topk", codes=c, granularity=M // 2),
        "StreamDecode": pb.StreamDecodeRequest(model_id="topk", activations=convert.from_numpy(GOOD_X),
                                               budget=pb.Budget(max_granularity=M // 2)),
    }


ONE_FIELD = {
    "Encode": {"model_id": MODEL_IDS, "activations": tensors(), "mode": MODE, "granularity": G},
    "DecodeAtGranularity": {"model_id": MODEL_IDS, "codes": codes(), "granularity": G, "output_dtype": DTYPE,
                            "max_k": st.one_of(st.integers(0, 6), INT64)},
    "StreamDecode": {"model_id": MODEL_IDS, "activations": tensors(), "codes": codes(), "budget": budgets(),
                     "payload": PAYLOAD, "ladder": ladders(), "output_dtype": DTYPE, "axis": AXIS,
                     "k_ladder": K_LADDERS},
}


def one_field_request(rpc: str, name: str, value):
    """A copy of the good request for `rpc` with field `name` replaced by `value`."""
    req = type(_good_requests()[rpc])()
    req.CopyFrom(_good_requests()[rpc])
    if isinstance(value, (pb.Tensor, pb.SparseCodes, pb.Budget)):
        getattr(req, name).CopyFrom(value)
    elif isinstance(value, list):
        getattr(req, name)[:] = value
    else:
        setattr(req, name, value)
    return req


def test_fuzz_one_field_of_a_good_request(stub, root, fuzz_cases):
    """A good request with exactly one field replaced by a fuzzed value (each bad value in isolation)."""
    tally = Tally()

    @settings(FUZZ, max_examples=300)
    @given(data=st.data(), rpc=st.sampled_from(sorted(ONE_FIELD)))
    def case(data, rpc):
        name = data.draw(st.sampled_from(sorted(ONE_FIELD[rpc])), label="field")
        value = data.draw(ONE_FIELD[rpc][name], label=name)
        call(tally, stub, root, rpc, one_field_request(rpc, name, value))

    case()
    settle(tally, stub, fuzz_cases, {rpc: 50 for rpc in ONE_FIELD})


def test_raw_bytes_never_kill_the_server(stub, server, root, fuzz_cases):
    """Random request bytes: decoded (unknown fields are legal protobuf) or INVALID_ARGUMENT; the server stays up."""
    tally = Tally()
    ch = grpc.insecure_channel(server.address)
    rng = np.random.default_rng(0)
    for i in range(120):
        raw = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        method = ["Encode", "DecodeAtGranularity", "GetModel", "StreamDecode"][i % 4]
        path = f"/progsae.v1.Progsae/{method}"
        fn = ch.unary_stream(path) if method == "StreamDecode" else ch.unary_unary(path)
        tally.cases["raw bytes"] += 1
        try:
            out = fn(raw, timeout=10)
            if method == "StreamDecode":
                list(out)
        except grpc.RpcError as e:
            assert e.code().name in DOCUMENTED, (e.code(), e.details())
            clean_message(e.details() or "", root)
    ch.close()
    assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    settle(tally, stub, fuzz_cases, {"raw bytes": 120})
