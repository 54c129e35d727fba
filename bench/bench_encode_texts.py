"""Several SAEs and several texts from one pass of the language model (EncodeTexts) against one EncodeText
call per SAE and per text, p50 over N calls, over real gRPC on loopback to the plain server.

SAEs: synthetic dictionaries at SmolLM2-135M's width (d_in 576, M 4608, k 32; the shipped LM, real text),
at layers 15 and 15 (two SAEs of one layer) and 3, 9, 15 (three layers). Texts: the first 64 or 256 tokens
of a Wikipedia-like paragraph. Run it alone (2-core machine):

    .venv/bin/python bench/bench_encode_texts.py --calls 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed La dame de fer, it was constructed as the centrepiece of the 1889 World's Fair, "
        "and to crown the centennial anniversary of the French Revolution. Although initially criticised by "
        "some of France's leading artists and intellectuals for its design, it has since become a global "
        "cultural icon of France and one of the most recognisable structures in the world. The tower received "
        "5,889,000 visitors in 2022. The Eiffel Tower is the most visited monument with an entrance fee in the "
        "world. It was designated a monument historique in 1964, and was named part of a UNESCO World Heritage "
        "Site in 1991. The tower is 330 metres tall, about the same height as an 81-storey building, and the "
        "tallest structure in Paris. Its base is square, measuring 125 metres on each side. ") * 2


def p50s(one, each, calls: int) -> tuple[float, float]:
    """p50 ms of `one` and of `each`, called alternately (both see the same machine)."""
    one(), each()  # warm
    t1, t2 = [], []
    for _ in range(calls):
        for fn, times in ((one, t1), (each, t2)):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return round(statistics.median(t1), 1), round(statistics.median(t2), 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--texts", type=int, default=8, help="texts of one batched call")
    a = p.parse_args()

    from progsae.clients import Client
    from progsae.server.grpc_server import PlainServer
    from progsae.server.registry import RegistryConfig
    from tests.support import synthetic as testing

    root = Path(tempfile.mkdtemp())
    for name, layer in (("l3", 3), ("l9", 9), ("l15", 15), ("l15b", 15)):
        testing.make_checkpoint(root / name, d=576, m=4608, k=32, orderings=False, model="smollm2-135m",
                                layer=layer, seed=layer + len(name))
    rows = []
    with PlainServer(RegistryConfig(root=str(root))) as server, Client(server.address, timeout=120) as c:
        for tokens in (64, 256):
            for models in (["l15", "l15b"], ["l3", "l9", "l15"]):
                one, each = p50s(lambda ms=models, n=tokens: c.encode_texts([TEXT], models=ms, max_tokens=n),
                                 lambda ms=models, n=tokens: [c.encode_text(TEXT, model=m, max_tokens=n) for m in ms],
                                 a.calls)
                rows.append({"tokens": tokens, "saes": "+".join(models), "one_pass_ms": one, "call_per_sae_ms": each,
                             "ratio": round(one / each, 2)})
                print(rows[-1], flush=True)
        texts = [TEXT[i * 40:] for i in range(a.texts)]  # different texts, about 64 tokens each
        one, each = p50s(lambda: c.encode_texts(texts, models=["l15"], max_tokens=64),
                         lambda: [c.encode_text(t, model="l15", max_tokens=64) for t in texts], a.calls)
        rows.append({"tokens": 64, "texts": a.texts, "saes": "l15", "one_pass_ms": one, "call_per_text_ms": each,
                     "ratio": round(one / each, 2)})
        print(rows[-1], flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
