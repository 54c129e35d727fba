"""Splice a stand-in for the residual stream into a causal LM at one layer; score its next tokens.

The protocol of CE loss recovered and KL (SPEC §5), for the trainer's evaluation and the server
alike. A batch holds contexts `ids` [B, T] whose position 0 is the start token (the same token in
every context) and the clean residual stream at `layer` of positions 1..T-1 (`body`):

* position 0's residual is `hidden_at_layer` of the start token alone. That is exact for a causal
  model (position 0 attends only to itself), and the layers below `layer` never run on the rest.
* a variant replaces the positions 1.. that `keep` marks with its stand-in (`splice`). Position 0
  and the positions `keep` leaves out keep their clean residual.
* only layers `layer`.. run (`models.forward_from_layer`): once on the clean stream, once with every
  replaced position zeroed (CE_zero), once per variant.
* scored: the next-token predictions from positions 1..T-2 (targets 2..T-1). Position 0's is the
  same in every variant, so it is left out.

`splice_losses` runs that over batches and sums CE and KL(p_clean || p_variant) per context
(progsae.sae.metrics.TokenLossAccumulator) for the clean stream, the zero-ablated one and every
variant. Its parts, `splice` and `next_token_log_probs`, serve a single text as well: `TextSplice`
scores one text's tokens, every one of them (the last token's prediction included), against its
clean predictions, for the server's per-rung fidelity (KL per token, top-1 agreement, the top
predictions). The same start-token residual, the same splice, the same log-probs and the same KL
(progsae.sae.metrics.token_kl) as the evaluation; what it adds is running only what the scored
positions need (`next_token_log_probs(positions=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Generic, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from progsae.lm.models import forward_from_layer, hidden_at_layer
from progsae.sae.metrics import CleanTerms, TokenLossAccumulator, clean_terms, token_kl

K = TypeVar("K", bound=Hashable)


class SpliceBatch(NamedTuple):
    """Contexts, their clean residual at the layer, and which positions a variant replaces."""

    ids: Tensor
    """[B, T] int64 token ids; position 0 is the start token."""
    body: Tensor
    """[B * (T-1), d] the clean residual at the layer of positions 1..T-1, context by context."""
    keep: Tensor
    """[B, T-1] bool: positions 1..T-1 that a variant replaces (and CE_zero zeroes)."""


@dataclass
class SpliceLosses(Generic[K]):
    """CE and KL sums, per context, of the clean stream, the zero-ablated one and each variant."""

    clean: TokenLossAccumulator = field(default_factory=TokenLossAccumulator)
    zero: TokenLossAccumulator = field(default_factory=TokenLossAccumulator)
    """Every replaced position's residual set to 0."""
    variants: dict[K, TokenLossAccumulator] = field(default_factory=dict[K, TokenLossAccumulator])
    """Per variant key, in the order the keys were first produced."""
    check: float | None = None
    """With `check`: the largest relative error of the assembled clean stream (start-token residual
    and `body`) against a real `hidden_at_layer` of the first batch's contexts."""


def splice(hidden: Tensor, keep: Tensor, repl: Tensor) -> Tensor:
    """hidden [B, T, d] with the positions 1.. that keep [B, T-1] marks taken from repl
    [B * (T-1), d] (cast to hidden's dtype); a copy, hidden is left as it is."""
    B, T = hidden.shape[:2]
    h = hidden.clone()
    body = h[:, 1:]  # a view: writing into it writes into h
    body[keep] = repl.view(B, T - 1, -1)[keep].to(h.dtype)
    return h


def next_token_log_probs(model: nn.Module, hidden: Tensor, layer: int, positions: Tensor | None = None) -> Tensor:
    """Float32 log-softmax [B * (T-2), vocab] of the next-token logits from positions 1..T-2 when
    hidden_states[layer] is `hidden` [B, T, d]; rows context by context.

    With `positions` (int64 [P], ascending, within 0..T-1): the predictions from those positions,
    [B * P, vocab]. A causal model's output at p depends on positions 0..p alone, so the layers run on
    positions 0..max(positions) only and the LM head on `positions` alone; the logits are the same as
    from the whole sequence (up to float summation order)."""
    if positions is None:
        logits = forward_from_layer(model, hidden, layer)[:, 1:-1].float()
    else:
        end = int(positions[-1]) + 1 if positions.numel() else 1
        logits = forward_from_layer(model, hidden[:, :end], layer, logits_to_keep=positions).float()
    return torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])


def start_residual(model: nn.Module, layer: int, start_id: int) -> Tensor:
    """[d] float32 hidden_states[layer] of the start token alone: position 0 of every context (exact for
    a causal model, which attends from position 0 to itself only)."""
    device = next(model.parameters()).device
    return hidden_at_layer(model, torch.tensor([[start_id]], device=device), layer).float().reshape(-1)


class NextTokens(NamedTuple):
    """The model's next-token predictions after some tokens of a text, with a stand-in spliced in,
    against the clean ones."""

    kl: Tensor
    """[P] float64 KL(p_clean || p) in nats (progsae.sae.metrics.token_kl)."""
    top1: Tensor
    """[P] bool: the most probable next token is the clean prediction's."""
    top_ids: Tensor
    """[P, n] int64 the n most probable next tokens, most probable first (n = the `top` asked)."""
    top_probs: Tensor
    """[P, n] float32 their probabilities."""


class TextSplice:
    """One text's residual stream at `layer` and the model's prediction after each of its tokens, clean
    and with a stand-in spliced in.

    The text is N tokens after a start token; `body` [N, d] is their clean residual at the layer, and
    position 0 is the start token's own (`hidden_at_layer` of it alone, as in `splice_losses`).
    `replace` [N] bool marks the tokens a stand-in replaces (default all); the others keep their clean
    residual. Token n's prediction is the model's output at position n + 1, the distribution of the token
    after it, so all N tokens are scored, the last one included.

    `score(state, tokens)` splices `state` [N, d] (every token's current stand-in) and scores the listed
    tokens only: the layers from `layer` on run over positions 0..(last listed token + 1) and the head
    over the listed positions. The clean pass runs with the first `score`, as a second row of the same
    forward (one pass of two rows costs less than two passes), which keeps of it what KL needs
    (metrics.clean_terms: p_clean and its negative entropy) and its top-1; `clean_top` is available after it.
    `h0`: the start token's residual when the caller has it (it depends on the model, layer and start
    token alone). Not thread-safe: the caller holds the model (forward_from_layer swaps its layers).
    """

    @torch.inference_mode()
    def __init__(self, model: nn.Module, layer: int, start_id: int, body: Tensor, replace: Tensor | None = None,
                 h0: Tensor | None = None):
        self.model, self.layer = model, layer
        self.device = next(model.parameters()).device
        n, d = body.shape
        if h0 is None:
            h0 = start_residual(model, layer, start_id)
        self.hidden = torch.cat([h0.reshape(1, 1, d).to(self.device), body.to(self.device, torch.float32)[None]], 1)
        self.n = n
        self.replace = (torch.ones(n, dtype=torch.bool) if replace is None else replace.bool()).to(self.device)
        self.clean: CleanTerms | None = None
        """The clean predictions' p [N, vocab] and negative entropy [N] (after the first `score`)."""
        self._argmax: Tensor | None = None

    @torch.inference_mode()
    def score(self, state: Tensor, tokens: Tensor, top: int = 0) -> NextTokens:
        """Splice `state` [N, d] in and score `tokens` (int64 [P], ascending, within 0..N-1)."""
        tokens = tokens.to(self.device)
        every = len(tokens) == self.n  # ascending and within 0..N-1: all of them
        h = splice(self.hidden, self.replace[None], state.to(self.device))
        if self.clean is None:
            both = next_token_log_probs(self.model, torch.cat([self.hidden, h]), self.layer,
                                        torch.arange(1, self.n + 1, device=self.device))
            self.clean, self._argmax = clean_terms(both[: self.n]), both[: self.n].argmax(-1)
            lp = both[self.n:] if every else both[self.n:][tokens]
        else:
            lp = next_token_log_probs(self.model, h, self.layer, tokens + 1)
        assert self.clean is not None and self._argmax is not None
        kl = token_kl(self.clean if every else CleanTerms(self.clean.p[tokens], self.clean.neg_entropy[tokens]), lp)
        probs, ids = lp.topk(top, dim=-1) if top > 0 else (lp[:, :0], torch.zeros(len(tokens), 0, dtype=torch.long))
        return NextTokens(kl.cpu(), (lp.argmax(-1) == self._argmax[tokens]).cpu(), ids.cpu(), probs.exp().cpu())

    def clean_top(self, top: int) -> tuple[Tensor, Tensor]:
        """([N, top] int64 ids, [N, top] float32 probabilities): the clean model's most probable next tokens."""
        if self.clean is None:
            raise RuntimeError("the clean pass runs with the first score")
        probs, ids = self.clean.p.topk(top, dim=-1)
        return ids.cpu(), probs.cpu()


@torch.no_grad()
def splice_losses(model: nn.Module, layer: int, batches: Iterable[SpliceBatch],
                  variants: Callable[[Tensor], Iterable[tuple[K, Tensor]]], *, check: bool = False,
                  on_forward: Callable[[int], object] | None = None) -> SpliceLosses[K]:
    """CE and KL of the clean, zero-ablated and every variant's stream over `batches`.

    `variants(body)` yields (key, stand-in [B * (T-1), d]) for one batch's body; a key's sums
    run over every batch it appears in. `on_forward(B)` is called after each forward pass of B
    contexts (progress). ValueError if the contexts are too short to score or start with
    different tokens.
    """
    out: SpliceLosses[K] = SpliceLosses()
    h0: Tensor | None = None
    start = -1
    for b in batches:
        B, T = b.ids.shape
        if T < 3:
            raise ValueError(f"contexts of {T} tokens leave nothing to score")
        if h0 is None:
            start = int(b.ids[0, 0])
            h0 = start_residual(model, layer, start).reshape(1, 1, -1)  # [1, 1, d]
        if bool((b.ids[:, 0] != start).any()):
            raise ValueError("contexts start with different tokens; expected one start token")
        hidden = torch.cat([h0.expand(B, 1, -1), b.body.view(B, T - 1, -1)], dim=1)
        if check and out.check is None:
            real = hidden_at_layer(model, b.ids, layer).float()
            err = (real - hidden).norm(dim=-1) / hidden.norm(dim=-1).clamp_min(1e-12)
            out.check = float(err.max())
        targets = b.ids[:, 2:].reshape(-1)

        def run(h: Tensor, n: int = B) -> Tensor:
            lp = next_token_log_probs(model, h, layer)
            if on_forward is not None:
                on_forward(n)
            return lp

        lp_clean = run(hidden)
        out.clean.update(lp_clean, lp_clean, targets, contexts=B)
        out.zero.update(lp_clean, run(splice(hidden, b.keep, torch.zeros_like(b.body))), targets, contexts=B)
        for key, repl in variants(b.body):
            acc = out.variants.setdefault(key, TokenLossAccumulator())
            acc.update(lp_clean, run(splice(hidden, b.keep, repl)), targets, contexts=B)
    return out
