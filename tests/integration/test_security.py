"""Security on the plain grpcio server: no pickle, size caps, bearer-token auth, TLS, path traversal."""

from __future__ import annotations

import ast
import datetime
import ipaddress
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progsae.cli import main
from progsae.clients import Client, ProgsaeError
from progsae.server.errors import ServiceError
from progsae.server.grpc_server import GrpcServerConfig, PlainServer
from progsae.server.registry import Registry, RegistryConfig
from progsae.server.service import ServiceConfig
from progsae.server.validate import Limits
from progsae.v1 import convert
from progsae.v1 import progsae_pb2 as pb
from progsae.v1 import progsae_pb2_grpc as pb_grpc
from tests.support import synthetic as testing

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ["progsae", "sae", "trainer", "server", "clients", "proto", "bench"]
D, M = 16, 64
LIMITS = Limits(max_request_bytes=64 * 1024, max_response_bytes=32 * 1024, max_tokens=4096)
TOKEN = "s3cret-token"


# --- no pickle anywhere ------------------------------------------------------------------------------------


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    unsafe_mods = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in unsafe_mods]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe_mods:
            bad.append(f"from {node.module} import")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            kw = {k.arg: k.value for k in node.keywords}
            if node.func.attr == "load" and owner == "torch":
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append("torch.load without weights_only=True")
            if node.func.attr in ("load", "loads") and owner in unsafe_mods:
                bad.append(f"{owner}.{node.func.attr}")
            a = kw.get("allow_pickle")
            if isinstance(a, ast.Constant) and a.value is True:
                bad.append("allow_pickle=True")
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    return [f"{where}:{b}" for b in bad]


def test_no_pickle_in_product_code():
    files = [p for d in PRODUCT for p in (REPO / d).rglob("*.py") if "_pb2" not in p.name]
    assert len(files) > 30
    found = [f for p in files for f in _findings(p)]
    assert not found, found


def test_the_pickle_check_catches_what_it_should(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("import pickle\nimport torch\nimport numpy as np\ntorch.load('x')\n"
                 "torch.load('x', weights_only=False)\ntorch.load('x', weights_only=True)\n"
                 "np.load('x', allow_pickle=True)\npickle.loads(b'')\n")
    found = _findings(f)
    assert len(found) == 5, found


# --- servers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("secckpt")
    testing.make_checkpoint(r / "topk", d=D, m=M, k=4, model=None)
    (r / "nested").mkdir()
    testing.make_checkpoint(r / "nested" / "mat", d=D, m=M, k=4, architecture="matryoshka", orderings=False,
                            model=None)
    return r


@pytest.fixture(scope="module")
def plain(root):
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS)) as s:
        yield s


@pytest.fixture(scope="module")
def authed(root):
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS),
                     GrpcServerConfig(auth_token=TOKEN)) as s:
        yield s


def x_of(n: int) -> np.ndarray:
    return testing.sample_activations(n, d=D, m=M).numpy()


def _code(fn) -> grpc.StatusCode:
    try:
        out = fn()
        if hasattr(out, "__next__"):
            list(out)
    except grpc.RpcError as e:
        assert "\n" not in (e.details() or "")
        return e.code()
    return grpc.StatusCode.OK


# --- message size caps, both directions ----------------------------------------------------------------


def test_request_cap(plain):
    stub = pb_grpc.ProgsaeStub(grpc.insecure_channel(plain.address, options=[
        ("grpc.max_send_message_length", 1 << 26)]))
    over = x_of(LIMITS.max_request_bytes // (4 * D) + 1)  # just over the service limit
    assert _code(lambda: stub.Encode(pb.EncodeRequest(activations=convert.from_numpy(over)), timeout=10)) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = pb.Tensor(data=bytes(LIMITS.max_request_bytes + (2 << 20)), shape=[1], dtype=1)  # over the transport cap
    assert _code(lambda: stub.Encode(pb.EncodeRequest(activations=huge), timeout=10)) \
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(lambda: stub.Encode(pb.EncodeRequest(activations=convert.from_numpy(x_of(8))), timeout=10)) \
        == grpc.StatusCode.OK


def test_response_cap(plain):
    n = LIMITS.max_response_bytes // (4 * D) + 1  # a reconstruction just over the response limit
    x = x_of(n)
    with Client(plain.address, timeout=10) as c:
        enc = c.encode(x, model="topk")
        with pytest.raises(ProgsaeError) as e:
            c.decode_at(enc, g=M)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "response limit" in e.value.details
        with pytest.raises(ProgsaeError) as e:
            list(c.stream(x, model="topk"))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [r.g for r in c.stream(x, model="topk", payload="none")][-1] == M  # no tensors: fine
        small = c.encode(x[: n // 2], model="topk")
        assert c.decode_at(small, g=M).reconstruction.shape == (n // 2, D)


def test_client_caps(plain):
    """The client's own cap (ClientConfig.max_message_bytes) applies to what it sends and receives."""
    codes = (np.zeros((32, 1), np.int64), np.ones((32, 1), np.float32))  # ~0.4 KB request, 2 KB answer
    with Client(plain.address, timeout=10, max_message_bytes=1024) as c:
        with pytest.raises(ProgsaeError) as e:
            c.decode_at(codes, g=M, model="topk")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(ProgsaeError) as e:
            c.encode(x_of(32), model="topk")  # 2 KB request
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.decode_at((codes[0][:4], codes[1][:4]), g=M, model="topk").reconstruction.shape == (4, D)


# --- bearer-token auth ---------------------------------------------------------------------------------


def test_auth_missing_or_wrong_token(authed):
    ch = grpc.insecure_channel(authed.address)
    stub = pb_grpc.ProgsaeStub(ch)
    enc = pb.EncodeRequest(model_id="topk", activations=convert.from_numpy(x_of(4)))
    stream = pb.StreamDecodeRequest(model_id="topk", activations=convert.from_numpy(x_of(4)))
    for md in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
               [("authorization", "Basic " + TOKEN)], [("authorization", "Bearer ")]):
        assert _code(lambda md=md: stub.Encode(enc, timeout=10, metadata=md)) == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda md=md: stub.StreamDecode(stream, timeout=10, metadata=md)) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda md=md: stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=md)) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert _code(lambda md=md: reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=md)) \
            == grpc.StatusCode.UNAUTHENTICATED
    # health stays open for probes
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    ch.close()
    with Client(authed.address, timeout=10, retries=0) as c:
        with pytest.raises(ProgsaeError) as e:
            c.models()
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "token" in e.value.details


def test_auth_good_token(authed):
    with Client(authed.address, timeout=10, token=TOKEN) as c:
        x = x_of(8)
        enc = c.encode(x, model="topk")
        assert c.decode_at(enc, g=M).reconstruction.shape == (8, D)
        assert [r.g for r in c.stream(x, model="topk")][-1] == M
        assert {m.model_id for m in c.models()} >= {"topk@mean_sq", "nested/mat@none"}


def test_auth_async_client(authed):
    import asyncio

    from progsae.clients import AsyncClient

    async def run():
        async with AsyncClient(authed.address, timeout=10, token=TOKEN) as c:
            return len(await c.models())

    assert asyncio.run(run()) > 0


def test_cli_token_flag_and_env(authed, monkeypatch, capsys):
    t = ["client", "--target", authed.address]
    with pytest.raises(SystemExit):
        main([*t, "models"])
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*t, "--token", TOKEN, "models"]) == 0
    assert "topk@mean_sq" in capsys.readouterr().out
    monkeypatch.setenv("PROGSAE_TOKEN", TOKEN)
    assert main([*t, "models"]) == 0
    monkeypatch.setenv("PROGSAE_TOKEN", "wrong")
    with pytest.raises(SystemExit):
        main([*t, "models"])
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- TLS ----------------------------------------------------------------------------------------------------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_f, key_f = tmp / "cert.pem", tmp / "key.pem"
    cert_f.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_f.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    return cert_f, key_f


def test_tls_with_token(root, tmp_path):
    cert, key = _self_signed(tmp_path)
    cfg = GrpcServerConfig(address="127.0.0.1:0", auth_token=TOKEN, tls_cert_file=str(cert), tls_key_file=str(key))
    with PlainServer(RegistryConfig(root=str(root)), ServiceConfig(limits=LIMITS), cfg) as s:
        target = f"localhost:{s.port}"
        with Client(target, timeout=10, token=TOKEN, tls_ca_file=str(cert)) as c:
            assert c.encode(x_of(4), model="topk").codes.tokens == 4
        with Client(target, timeout=10, tls_ca_file=str(cert), retries=0) as c:
            with pytest.raises(ProgsaeError) as e:
                c.models()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(target, timeout=3, token=TOKEN, retries=0) as c:  # plaintext against a TLS port
            with pytest.raises(ProgsaeError) as e:
                c.models()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert main(["client", "--target", target, "--token", TOKEN, "--tls-ca", str(cert), "models"]) == 0


# --- path traversal ------------------------------------------------------------------------------------


SEGMENTS = ["..", ".", "topk", "nested", "mat", "link", "outside", "", "%2e%2e", "~", "\x00", "\\..", "cfg.json",
            "..%2f", " "]


@settings(deadline=None, database=None, max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=5), lead=st.sampled_from(["", "/", "./"]),
       ordering=st.sampled_from(["", "@none", "@mean_sq", "@../x", "@/etc"]))
def test_model_ids_never_escape_the_root(root, tmp_path_factory, parts, lead, ordering):
    outside = tmp_path_factory.getbasetemp() / "outside-target"
    if not outside.exists():
        testing.make_checkpoint(outside, d=D, m=M, k=4, model=None)  # a real checkpoint outside the root
        (root / "link").symlink_to(outside)  # a symlink inside the root pointing out of it
    reg = Registry(RegistryConfig(root=str(root)))
    mid = lead + "/".join(parts) + ordering
    try:
        spec = reg.resolve(mid)
    except ServiceError as e:
        assert e.status.value in ("INVALID_ARGUMENT", "NOT_FOUND"), mid
        assert str(root) not in e.message
        return
    assert spec.path.resolve().is_relative_to(root.resolve()), (mid, spec.path)
    assert spec.name in ("topk", "nested/mat"), (mid, spec.name)
