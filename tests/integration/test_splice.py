"""progsae.lm.splice on a tiny random Llama: the clean splice is the plain forward, a stand-in equal to
the clean stream changes nothing, and the zero-ablated one does."""

from __future__ import annotations

import pytest
import torch

from progsae.lm.models import forward_from_layer, hidden_at_layer
from progsae.lm.splice import SpliceBatch, TextSplice, next_token_log_probs, splice, splice_losses
from progsae.sae.metrics import token_kl

VOCAB, D, T, LAYER, START = 97, 32, 9, 1, 1


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def batches(model, n: int, per_batch: int, keep_every: int = 1) -> list[SpliceBatch]:
    ids = torch.randint(2, VOCAB, (n, T), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = START
    body = hidden_at_layer(model, ids, LAYER)[:, 1:].float()
    keep = torch.zeros(n, T - 1, dtype=torch.bool)
    keep[:, ::keep_every] = True
    return [SpliceBatch(ids[i:i + per_batch], body[i:i + per_batch].reshape(-1, D), keep[i:i + per_batch])
            for i in range(0, n, per_batch)]


def test_splice_replaces_only_kept_positions():
    hidden = torch.randn(2, 4, 3)
    keep = torch.tensor([[True, False, True], [False, False, True]])
    out = splice(hidden, keep, torch.zeros(6, 3))
    assert torch.equal(out[:, 0], hidden[:, 0])  # the start position is never replaced
    assert torch.equal(out[:, 1:][keep], torch.zeros(3, 3)) and torch.equal(out[:, 1:][~keep], hidden[:, 1:][~keep])
    assert not torch.equal(hidden[:, 1:][keep], torch.zeros(3, 3))  # the input is left as it was


def test_clean_stream_reproduces_the_plain_forward(model):
    bs = batches(model, 5, 2)
    forwards: list[int] = []
    r = splice_losses(model, LAYER, bs, lambda body: [("same", body), ("noisy", body + 0.5)], check=True,
                      on_forward=forwards.append)
    assert r.check is not None and r.check < 1e-5
    ids = torch.cat([b.ids for b in bs])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[:, 1:-1].double(), -1)
    direct = -logp.gather(-1, ids[:, 2:, None]).mean()
    assert r.clean.ce == pytest.approx(float(direct), abs=1e-5)
    assert r.clean.n == 5 * (T - 2) and r.clean.context_tokens == [T - 2] * 5
    assert list(r.variants) == ["same", "noisy"]
    assert r.variants["same"].ce == pytest.approx(r.clean.ce, abs=1e-6) and r.variants["same"].kl < 1e-6
    assert r.variants["noisy"].kl > 1e-4 and r.zero.kl > 1e-4  # (a random model's CE need not move)
    assert forwards == [2] * 4 + [2] * 4 + [1] * 4  # clean, zero and two variants per batch of 2, 2, 1


def test_positions_left_out_keep_their_clean_residual(model):
    def zeros(body: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        return [("zero", torch.zeros_like(body))]

    every = splice_losses(model, LAYER, batches(model, 3, 3), zeros)
    some = splice_losses(model, LAYER, batches(model, 3, 3, keep_every=2), zeros)
    assert every.variants["zero"].context_ce == every.zero.context_ce  # a zero stand-in is the zero ablation
    assert 1e-6 < some.zero.kl < every.zero.kl


def test_refuses_mixed_start_tokens_and_short_contexts(model):
    (b,) = batches(model, 2, 2)
    ids = b.ids.clone()
    ids[1, 0] = START + 1
    with pytest.raises(ValueError, match="start with different tokens"):
        splice_losses(model, LAYER, [b._replace(ids=ids)], lambda body: [])
    with pytest.raises(ValueError, match="nothing to score"):
        splice_losses(model, LAYER, [SpliceBatch(b.ids[:, :2], b.body.view(2, T - 1, D)[:, :1].reshape(-1, D),
                                                 b.keep[:, :1])], lambda body: [])


def _offline(model, hidden: torch.Tensor, keep: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The evaluation's per-token KL of one text: the whole sequence spliced, `next_token_log_probs`
    over positions 1..T-2 and, for the last token, the plain forward's last position."""
    h = splice(hidden, keep[None], state)
    kl = token_kl(next_token_log_probs(model, hidden, LAYER), next_token_log_probs(model, h, LAYER))
    last = [torch.log_softmax(forward_from_layer(model, v, LAYER)[0, -1:].float(), -1) for v in (hidden, h)]
    return torch.cat([kl, token_kl(*last)])


def test_text_splice_scores_each_token_as_the_offline_splice(model):
    """TextSplice (the server's per-rung fidelity) reports, for any listed tokens of any state, the KL the
    evaluation's own splice computes over the whole sequence, to 1e-5 relative; an outlier position left
    out of `replace` keeps its clean residual; the clean state scores 0 and agrees on top-1."""
    ids = torch.randint(2, VOCAB, (1, T), generator=torch.Generator().manual_seed(5))
    ids[0, 0] = START
    hidden = hidden_at_layer(model, ids, LAYER).float()
    body = hidden[0, 1:]
    n = T - 1
    replace = torch.ones(n, dtype=torch.bool)
    replace[2] = False
    ts = TextSplice(model, LAYER, START, body, replace)
    g = torch.Generator().manual_seed(6)
    cases = [(torch.arange(n), 0.6), (torch.tensor([1, 3, 4]), 0.3), (torch.tensor([0]), 0.2),
             (torch.tensor([n - 1]), 0.1), (torch.tensor([2, 5]), 0.4)]
    for tokens, noise in cases:
        state = body + noise * torch.randn(body.shape, generator=g)
        got = ts.score(state, tokens, top=3)
        want = _offline(model, hidden, replace, state)[tokens]
        # float32 log-probs carry ~1e-7 of rounding whatever the path: below that KL is noise
        torch.testing.assert_close(got.kl, want, rtol=1e-5, atol=1e-7)
        assert (got.kl > 1e-6).all()  # the noise moved every listed prediction
        assert got.top_ids.shape == (len(tokens), 3) and (got.top_probs[:, :-1] >= got.top_probs[:, 1:]).all()
    moved = body.clone()
    moved[2] += 100.0  # not replaced: its stand-in is ignored
    same = ts.score(moved, torch.arange(n), top=1)
    assert same.kl.abs().max() < 1e-5 and same.top1.all()
    ids_top, p_top = ts.clean_top(2)
    assert ids_top.shape == (n, 2) and torch.equal(ids_top[:, 0], same.top_ids[:, 0])
    torch.testing.assert_close(p_top.sum(1) <= 1.0 + 1e-6, torch.ones(n, dtype=torch.bool))


def test_positions_run_only_the_prefix_they_need(model):
    """next_token_log_probs(positions=...) equals the whole sequence's rows at those positions."""
    ids = torch.randint(2, VOCAB, (2, T), generator=torch.Generator().manual_seed(8))
    hidden = hidden_at_layer(model, ids, LAYER).float()
    full = torch.log_softmax(forward_from_layer(model, hidden, LAYER).float(), -1)
    pos = torch.tensor([1, 4, 6])
    got = next_token_log_probs(model, hidden, LAYER, pos).view(2, 3, -1)
    torch.testing.assert_close(got, full[:, pos], rtol=1e-5, atol=1e-5)
