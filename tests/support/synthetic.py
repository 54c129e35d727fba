"""Synthetic checkpoints for tests, benchmarks and smoke runs (no trainer needed).

Data with a power-law spectrum of sparse causes, an SAE whose dictionary is those causes,
orderings from `ImportanceAccumulator`: progressive decoding then has something to find.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch

from progsae.sae import checkpoint
from progsae.sae import ordering as ordmod
from progsae.sae.codec import SAE, default_ladder


def synthetic_data(n: int, atoms: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """n tokens of sparse power-law combinations of the rows of `atoms` plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    m, d = atoms.shape
    freq = 0.05 * torch.arange(1, m + 1, dtype=torch.float32) ** -0.5
    on = torch.rand(n, m, generator=g) < freq
    return (on * (1 + 2 * torch.rand(n, m, generator=g))) @ atoms + 0.01 * torch.randn(n, d, generator=g)


def make_checkpoint(
    path: str | Path,
    d: int = 32,
    m: int = 256,
    k: int = 8,
    architecture: str = "topk",
    ladder: tuple[int, ...] | None = None,
    orderings: bool = True,
    seed: int = 0,
    model: str | None = "synthetic",
    layer: int | None = None,
) -> Path:
    """Write a checkpoint whose decoder rows are the data's atoms (shuffled for topk)."""
    g = torch.Generator().manual_seed(seed + 100)
    atoms = _atoms(d, m, seed)
    x = synthetic_data(2048, atoms, seed + 1)
    # Matryoshka: latents in importance order already; topk: a random order, to be sorted.
    perm = torch.arange(m) if architecture == "matryoshka" else torch.randperm(m, generator=g)
    W = atoms[perm]
    sae = SAE(W_enc=W.T.clone(), W_dec=W.clone(), b_enc=torch.full((m,), -0.8), b_dec=torch.zeros(d), k=k, scale=1.0)
    stored = None
    if orderings:
        acc = ordmod.ImportanceAccumulator(sae)
        acc.update(sae.encode(x))
        stored = {c: acc.ordering(c) for c in ordmod.CRITERIA}
    meta = checkpoint.CheckpointMeta(
        architecture=architecture, d_in=d, d_sae=m, k=k, granularities=tuple(ladder or default_ladder(m)),
        model=model, layer=layer, extra={"synthetic": True},
    )
    return checkpoint.save(path, sae, meta, stored, metrics={"summary": {"fvu": 0.1}})


def _atoms(d: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)


def sample_activations(n: int, d: int = 32, m: int = 256, seed: int = 0, sample_seed: int = 2) -> torch.Tensor:
    """Fresh tokens from the distribution `make_checkpoint(d=d, m=m, seed=seed)` was built for."""
    return synthetic_data(n, _atoms(d, m, seed), sample_seed)


def error_cases(x, d_sae: int, good_model: str, max_request_bytes: int):
    """(name, rpc, request, expected status name) for the issue's error matrix.

    `x` is a valid [N, d_in] float32 numpy batch for `good_model` (N >= 2).
    """
    import numpy as np

    from progsae.v1 import convert
    from progsae.v1 import progsae_pb2 as pb

    t = convert.from_numpy
    n, d = x.shape
    good_codes = convert.codes_from_arrays(np.tile(np.arange(4), (n, 1)), np.ones((n, 4), np.float32))
    nan = x.copy()
    nan[0, 0] = np.nan
    inf = x.copy()
    inf[1, 2] = np.inf
    mismatch = t(x)
    mismatch.shape[:] = [n, d + 1]
    dtype_unset = t(x)
    dtype_unset.dtype = pb.DTYPE_UNSPECIFIED
    # an unknown enum value on purpose (protoc's .pyi admits only DType members)
    wrong_dtype = pb.Tensor(data=x.astype(np.int32).tobytes(), shape=[n, d], dtype=99)  # pyright: ignore[reportArgumentType]
    out_of_range = convert.codes_from_csr(convert.SparseArrays(np.array([0, 2]), np.array([1, d_sae]),
                                                               np.ones(2, np.float32)))
    dup = convert.codes_from_csr(convert.SparseArrays(np.array([0, 2]), np.array([3, 3]), np.ones(2, np.float32)))
    big_rows = max_request_bytes // (4 * d) + 1
    big = pb.Tensor(data=bytes(4 * d * big_rows), shape=[big_rows, d], dtype=pb.DTYPE_FLOAT32)
    E, D, S = pb.EncodeRequest, pb.DecodeRequest, pb.StreamDecodeRequest
    m = good_model
    return [
        ("wrong width", "Encode", E(model_id=m, activations=t(x[:, :-1])), "INVALID_ARGUMENT"),
        ("wrong dtype", "Encode", E(model_id=m, activations=wrong_dtype), "INVALID_ARGUMENT"),
        ("dtype unset", "Encode", E(model_id=m, activations=dtype_unset), "INVALID_ARGUMENT"),
        ("shape/bytes mismatch", "Encode", E(model_id=m, activations=mismatch), "INVALID_ARGUMENT"),
        ("NaN", "Encode", E(model_id=m, activations=t(nan)), "INVALID_ARGUMENT"),
        ("Inf", "StreamDecode", S(model_id=m, activations=t(inf)), "INVALID_ARGUMENT"),
        ("empty batch", "Encode", E(model_id=m, activations=t(x[:0])), "INVALID_ARGUMENT"),
        ("G = 0", "DecodeAtGranularity", D(model_id=m, codes=good_codes, granularity=0), "INVALID_ARGUMENT"),
        ("G > M", "DecodeAtGranularity", D(model_id=m, codes=good_codes, granularity=d_sae + 1),
         "INVALID_ARGUMENT"),
        ("prefix G > M", "Encode", E(model_id=m, activations=t(x), mode=pb.ENCODE_MODE_PREFIX,
                                     granularity=d_sae + 1), "INVALID_ARGUMENT"),
        ("unknown model", "Encode", E(model_id="no-such-model", activations=t(x)), "NOT_FOUND"),
        ("path traversal", "Encode", E(model_id="../../etc", activations=t(x)), "INVALID_ARGUMENT"),
        ("absolute path", "GetModel", pb.GetModelRequest(model_id="/etc/passwd"), "INVALID_ARGUMENT"),
        ("index out of range", "DecodeAtGranularity", D(model_id=m, codes=out_of_range, granularity=d_sae),
         "INVALID_ARGUMENT"),
        ("duplicate index", "DecodeAtGranularity", D(model_id=m, codes=dup, granularity=d_sae), "INVALID_ARGUMENT"),
        ("zero deadline", "StreamDecode", S(model_id=m, activations=t(x), budget=pb.Budget(deadline_ms=0)),
         "INVALID_ARGUMENT"),
        ("negative deadline", "StreamDecode", S(model_id=m, activations=t(x), budget=pb.Budget(deadline_ms=-5)),
         "INVALID_ARGUMENT"),
        ("target FVU 0", "StreamDecode", S(model_id=m, activations=t(x), budget=pb.Budget(target_fvu=0.0)),
         "INVALID_ARGUMENT"),
        ("target FVU > 1", "StreamDecode", S(model_id=m, activations=t(x), budget=pb.Budget(target_fvu=1.5)),
         "INVALID_ARGUMENT"),
        ("max G > M", "StreamDecode", S(model_id=m, codes=good_codes, budget=pb.Budget(max_granularity=d_sae + 1)),
         "INVALID_ARGUMENT"),
        ("oversized message", "Encode", E(model_id=m, activations=big), "RESOURCE_EXHAUSTED"),
        ("missing activations", "Encode", E(model_id=m), "INVALID_ARGUMENT"),
        ("missing codes", "DecodeAtGranularity", D(model_id=m, granularity=4), "INVALID_ARGUMENT"),
        ("missing stream input", "StreamDecode", S(model_id=m), "INVALID_ARGUMENT"),
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for test and bench servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def calls_during_large_encode(address: str, model: str, big, settle_s: float = 0.2) -> tuple[int, int]:
    """Start an Encode of `big` ([N, d_in] float32) on one channel; after settle_s, send GetModel and a
    4-token Encode, one after another, on another channel until it ends. -> (probe pairs answered while
    the large call still ran, all probe pairs). A server that computes on its event loop answers none."""
    import threading
    import time

    from progsae.clients import Client

    done = threading.Event()
    errors: list[BaseException] = []

    def large() -> None:
        try:
            with Client(address, timeout=300) as c:
                c.encode(big, model=model)
        except BaseException as e:  # noqa: BLE001  (reported to the caller)
            errors.append(e)
        finally:
            done.set()

    answered = total = 0
    with Client(address, timeout=300) as c:
        c.encode(big[:4], model=model)  # model loaded, channel warm
        t = threading.Thread(target=large)
        t.start()
        time.sleep(settle_s)
        while not done.is_set():
            c.model(model)
            c.encode(big[:4], model=model)
            total += 1
            answered += not done.is_set()
        t.join()
    if errors:
        raise errors[0]
    return answered, total
