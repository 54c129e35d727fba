"""What each rung of a text stream does to the language model (proto revision 5, `Fidelity`).

A text stream with fidelity on splices each rung's reconstruction into the checkpoint's language model
at the SAE's layer, in place of the true activation, and compares the model's next-token prediction
after every token it computed with the clean one: KL(p_clean || p_rung) in nats, whether the most
probable next token agrees, and (on request) the most probable next tokens. The maths is
progsae.lm.splice's `TextSplice`, the evaluation's splice (`progsae eval --ce`): the same start-token
residual, the same splice, the same log-probs, the same KL (progsae.sae.metrics.token_kl).

What is spliced: the stream's current reconstruction of every token, a finished token's final one (a
causal model's prediction after token n reads every position up to n). A token the checkpoint's outlier
policy excludes keeps its clean activation, as in evaluation: its norm is above the threshold the
trainer recorded (`outlier_policy.threshold`), or, for a checkpoint that recorded none (a SAELens
import), above DEFAULT_FACTOR x the text's own median norm (the trainer's default rule). An attention
sink reconstructed by an SAE never trained on it would wreck every later prediction.

What runs, per rung: the layers after the SAE's over positions 0..(last token still refining), and the
language-model head only at the tokens the rung computed (progsae.lm.splice.next_token_log_probs with
`positions`); the clean pass rides with the first rung's, as a second row of one forward. Under a
per-token KL budget (`Budget.token_target_kl`) the budget engine (progsae.sae.budgets.climb) calls
`Fidelity.score` with the tokens still refining and stops each at its first rung whose KL is <= the
target, exactly as it does for token_target_fvu: the core knows no language model, only the numbers.

A finished token's KL is the one measured at its final rung. Tokens before it that keep refining can
still move its prediction afterwards; that drift is not re-measured (it would cost a head pass per
finished token per rung). RESULTS.md "Budgets the model can feel" measures how large it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from progsae.v1 import progsae_pb2 as pb

from .errors import ServiceError, Status
from .registry import ServedModel
from .text import TextBackend

if TYPE_CHECKING:
    from progsae.lm.splice import NextTokens, TextSplice

_START: dict[tuple[str, int, int], Tensor] = {}
"""The start token's residual per (LM, layer, start token): the same for every text (guarded by the LM's lock)."""
MAX_PREDICTIONS = 20
"""Most next tokens a rung may carry per token (Fidelity.predictions)."""
DEFAULT_FACTOR = 10.0
"""The trainer's default outlier factor (progsae.trainer.data.outlier_policy), for checkpoints that
recorded no policy."""

Prediction = tuple[int, float, str]
"""(token id, probability, the token as the tokenizer decodes it)."""


@dataclass(frozen=True)
class Ask:
    """What a stream asked for (validated; progsae.server.validate)."""

    predictions: int = 0
    """Most probable next tokens per computed token (0: KL and top-1 only)."""
    token_target_kl: float | None = None
    """Per-token KL budget, nats."""


@dataclass(frozen=True)
class RungFidelity:
    """What one rung did to the model's predictions, for the tokens it computed."""

    kl: list[float]
    """Per computed token, KL(p_clean || p_rung), nats."""
    top1: list[bool]
    """Per computed token: the most probable next token is the clean one."""
    mean_kl: float
    """Over every token, a finished one at its final rung."""
    predictions: list[list[Prediction]] | None
    """Per computed token, the most probable next tokens (None unless asked)."""
    clean: list[list[Prediction]] | None
    """First rung only, per token: the clean model's most probable next tokens (None unless asked)."""


def spliced_tokens(model: ServedModel, x: Tensor) -> Tensor:
    """[N] bool: the tokens whose reconstruction is spliced in (the module docstring's outlier rule)."""
    norms = x.double().norm(dim=1)
    policy = (model.meta.extra or {}).get("outlier_policy")
    if isinstance(policy, dict):
        threshold: Any = policy.get("threshold")
        if policy.get("factor") is None or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            return torch.ones_like(norms, dtype=torch.bool)
        return norms <= float(threshold)
    return norms <= DEFAULT_FACTOR * norms.median()


class Fidelity:
    """One text stream's per-rung fidelity: the splice of its tokens, every token's current
    reconstruction, and the latest KL and top-1 of each token."""

    def __init__(self, model: ServedModel, x: Tensor, ask: Ask, backend: TextBackend | None = None):
        """`x` [N, d_in]: the text's clean activations at the SAE's layer (the stream's input)."""
        from progsae.lm.splice import TextSplice, start_residual

        meta = model.meta
        if not meta.model or meta.layer is None:
            raise ServiceError(Status.FAILED_PRECONDITION,
                               f"model {model.id} names no language model and layer; fidelity needs both")
        self.alias, self.layer, self.ask = meta.model, int(meta.layer), ask
        self.backend = backend or TextBackend()
        x = x.detach().float().cpu()
        self.spliced = spliced_tokens(model, x)
        with self.backend.holding(self.alias) as lm:
            if lm.d_model != x.shape[1]:
                raise ServiceError(Status.FAILED_PRECONDITION,
                                   f"language model {self.alias!r} has width {lm.d_model}, model {model.id} "
                                   f"d_in={x.shape[1]}")
            self.tokenizer = lm.tokenizer
            key = (self.alias, self.layer, lm.start_token_id)
            if key not in _START:
                _START[key] = start_residual(lm.model, self.layer, lm.start_token_id)
            self.splice: TextSplice = TextSplice(lm.model, self.layer, lm.start_token_id, x, self.spliced, _START[key])
        n = x.shape[0]
        self.state = x.clone()  # every token's current stand-in; rung 0 computes every token
        self.last: NextTokens | None = None
        self.token_kl = torch.full((n,), math.nan, dtype=torch.float64)
        self.token_top1 = torch.zeros(n, dtype=torch.bool)
        self._names: dict[int, str] = {}

    def score(self, tokens: Tensor, recon: Tensor) -> Tensor:
        """The budget engine's Score: [A] KL of the tokens still refining at this rung (their rows of
        `recon` spliced in with every other token's latest reconstruction)."""
        tokens = tokens.cpu()
        self.state[tokens] = recon.detach().float().cpu()
        with self.backend.holding(self.alias):
            self.last = self.splice.score(self.state, tokens, self.ask.predictions)
        self.token_kl[tokens] = self.last.kl
        self.token_top1[tokens] = self.last.top1
        return self.last.kl

    def rung(self, first: bool) -> RungFidelity:
        """What the last `score` measured, for the rung's event."""
        last = self.last
        assert last is not None  # the engine scores every rung before it is sent
        n = self.ask.predictions
        preds = clean = None
        if n > 0:
            preds = self._named(last.top_ids, last.top_probs)
            if first:
                clean = self._named(*self.splice.clean_top(n))
        return RungFidelity(last.kl.tolist(), last.top1.tolist(), float(self.token_kl.nanmean()), preds, clean)

    def _named(self, ids: Tensor, probs: Tensor) -> list[list[Prediction]]:
        flat = ids.reshape(-1).tolist()
        new = sorted({i for i in flat if i not in self._names})
        if new:
            self._names.update(zip(new, self.tokenizer.batch_decode([[i] for i in new]), strict=True))
        return [[(int(i), round(float(p), 6), self._names[int(i)]) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(ids.tolist(), probs.tolist(), strict=True)]


# --- protobuf ---------------------------------------------------------------------------------


def predictions_message(preds: list[Prediction]) -> pb.Predictions:
    return pb.Predictions(ids=[i for i, _, _ in preds], probs=[p for _, p, _ in preds], tokens=[s for _, _, s in preds])


def fill_rung(msg: pb.Rung, f: RungFidelity) -> None:
    msg.kl.extend(f.kl)
    msg.top1.extend(f.top1)
    msg.mean_kl = f.mean_kl
    for p in f.predictions or ():
        msg.predictions.append(predictions_message(p))
    for p in f.clean or ():
        msg.clean_predictions.append(predictions_message(p))
