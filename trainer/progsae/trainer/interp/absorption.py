"""Feature absorption on the first-letter task (Chanin et al., "A is for Absorption", as SAEBench runs it).

Words. Single-token words of the model's own tokenizer: tokens that decode to a space and 2+
ASCII letters; the label is the first letter (26 classes). A fixed sample, split 80/20 by a
seeded shuffle into probe-train and test words.

Activations. Each word is read at the SAE's layer at its own position, after the start token and
a fixed in-context prefix of `n_icl` examples "{word} has the first letter: {L}\\n" (SAEBench
varies the examples per word; a fixed prefix keeps every prompt the same length, and the causal
model makes the text after the word irrelevant). The prefix also keeps the word away from
position 1, where SmolLM2 puts its huge-norm attention sink.

Probes. One logistic-regression probe per letter (one-vs-rest, class-balanced) on the raw
activations of the probe-train words; a letter is evaluated only if its probe's F1 on the test
words is >= `min_probe_f1` (SAEBench: 0.6).

Main latents. Per letter, the SAE's latents (those allowed at granularity G) are ranked by the
difference of their mean activation on the letter's train words and on the others (SAEBench
ranks by the weights of an L1-regularised probe on all latents; for sparse codes both pick the
latents that fire on the letter). k-sparse probes on the top k = 1, 2, ... latents are fitted
(class-balanced logistic regression) and k grows while test F1 rises by more than `f1_jump`
(SAEBench's feature-splitting rule); the latents of the last k kept are the *main latents*.

Absorption, on each test word of the letter that its probe scores positive (SAEBench's
"probe true positives"), with p the unit probe direction, x the activation, b_dec the SAE's
decoder bias and c_i = a_i * (W_dec[i] . p) the projection of latent i's contribution onto p:

    act = (x - b_dec) . p            (SAEBench uses x . p; the decoder bias is no latent's work)
    main = sum of c_i over the main latents
    full absorption   <=> every main latent is 0, the top-c latent has cos(W_dec, p) >= 0.025,
                          act > 0 and its c >= 0.4 * act
    absorption fraction: 0 if main >= act or the top-3 positive c_i of non-main latents with
                         cos >= 0.1 sum to < 0.4 * act; 1 if main <= 0; else
                         min(that sum, act - main) / (min(that sum, act - main) + main)

Per letter: full-absorption rate = full words / probe true positives, and mean fraction; the
score is the mean over evaluated letters. `absorption_at` measures the SAE truncated to a
prefix of G latents (nested truncation of one full encode, as decode at G does), so main and
absorbing latents are both chosen among the first G.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from progsae.lm.models import LoadedModel

LETTERS = string.ascii_lowercase


class Words(NamedTuple):
    """The first-letter task's words."""

    token_ids: list[int]
    words: list[str]
    letters: np.ndarray
    """[n] int64 letter index 0..25."""


class Probes(NamedTuple):
    """One linear probe per letter on raw activations."""

    W: Tensor
    """[26, d_in] weights."""
    b: Tensor
    """[26] biases; the probe fires when x @ W.T + b > 0."""
    f1: list[float]
    """Per letter, F1 on the test words (NaN where a letter has no test word)."""


class LetterTask(NamedTuple):
    """Probe-train and test activations, their labels, and the probes."""

    x_train: Tensor
    """[n_train, d_in] raw activations."""
    y_train: np.ndarray
    x_test: Tensor
    """[n_test, d_in]"""
    y_test: np.ndarray
    probes: Probes


class AbsorptionScore(NamedTuple):
    """Absorption of the SAE truncated to its first g latents (in one order)."""

    g: int
    full_rate: float
    """Mean over evaluated letters of (fully absorbed words / probe true positives)."""
    fraction: float
    """Mean over evaluated letters of the mean absorption fraction."""
    letters: int
    """Letters evaluated (probe F1 >= threshold, >= 1 main latent, >= 1 probe true positive)."""
    main_latents: float
    """Mean main latents per evaluated letter."""
    words: int
    """Probe true positives scored, over all evaluated letters."""


@dataclass
class AbsorptionConfig:
    """SAEBench's thresholds (defaults are its values)."""

    min_probe_f1: float = 0.6
    """A letter is evaluated only if its probe's test F1 reaches this."""
    f1_jump: float = 0.03
    """Main latents: k grows while the k-sparse probe's test F1 rises by more than this."""
    max_k: int = 10
    """Main latents: at most this many."""
    full_cos: float = 0.025
    """Full absorption: the top-projecting latent's decoder cosine with the probe must reach this."""
    fraction_cos: float = 0.1
    """Absorption fraction: a candidate absorbing latent's decoder cosine with the probe must reach this."""
    proportion: float = 0.4
    """Absorbing latents must carry at least this share of the activation's probe projection."""
    max_absorbers: int = 3
    """Absorption fraction: at most this many absorbing latents are summed."""


# --- words and activations ------------------------------------------------------------------


def first_letter_words(tokenizer: object, max_words: int = 3000, seed: int = 0) -> Words:
    """A seeded sample of the tokenizer's single-token words " [A-Za-z]{2,}"."""
    vocab = len(tokenizer)  # type: ignore[arg-type]
    found: list[tuple[int, str]] = []
    for i in range(vocab):
        s = tokenizer.decode([i])  # type: ignore[attr-defined]
        w = s[1:]
        if len(s) >= 3 and s[0] == " " and w.isascii() and w.isalpha():
            found.append((i, w))
    if not found:
        raise ValueError("the tokenizer has no single-token words of the form ' [A-Za-z]{2,}'")
    pick = np.random.default_rng(seed).permutation(len(found))[:max_words]
    chosen = [found[i] for i in pick]
    return Words([i for i, _ in chosen], [w for _, w in chosen],
                 np.array([LETTERS.index(w[0].lower()) for _, w in chosen], dtype=np.int64))


def icl_prefix(lm: LoadedModel, words: Words, n_icl: int) -> list[int]:
    """Start token + n_icl examples "{word} has the first letter: {L}\\n" (the sample's first words)."""
    text = "".join(f"{w.strip()} has the first letter: {w.strip()[0].upper()}\n" for w in words.words[:n_icl])
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [lm.start_token_id, *ids]


@torch.no_grad()
def word_activations(lm: LoadedModel, prefix: list[int], token_ids: list[int], layer: int,
                     batch: int = 64) -> Tensor:
    """[n, d_model] activation at each word's position, the word following `prefix`.

    The prefix runs once; its keys and values (of the layers below `layer`, all the word needs)
    are repeated over each batch of words, so a word costs one position, not len(prefix) + 1.
    """
    import copy

    from transformers import DynamicCache

    from progsae.lm.models import hidden_at_layer

    device = next(lm.model.parameters()).device
    cache = DynamicCache()
    hidden_at_layer(lm.model, torch.tensor([prefix], device=device), layer, cache=cache, use_cache=True)
    out = []
    for i in range(0, len(token_ids), batch):
        ids = torch.tensor(token_ids[i:i + batch], device=device)[:, None]
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(len(ids))
        h = hidden_at_layer(lm.model, ids, layer, cache=c, use_cache=True)
        out.append(h[:, -1, :].float().cpu())
    return torch.cat(out)


# --- probes -----------------------------------------------------------------------------------


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else float("nan")


def train_probes(x: Tensor, y: np.ndarray, x_test: Tensor, y_test: np.ndarray, steps: int = 1000,
                 lr: float = 0.02, weight_decay: float = 1e-4) -> Probes:
    """One-vs-rest logistic probes, class-balanced (full-batch Adam on standardised inputs).

    The gradient is written out (d loss / d logit = (pw*t + 1 - t) * sigmoid - pw*t for BCE with
    positive weight pw): torch.optim's first step imports the compiler stack, seconds for nothing here.
    """
    # zero initialisation and full batches: nothing random, so no seed
    xd = x.double()
    mu, sd = xd.mean(0), xd.std(0).clamp_min(1e-6)
    xs = torch.cat([(xd - mu) / sd, torch.ones(len(xd), 1, dtype=torch.float64)], 1).float()
    t = torch.nn.functional.one_hot(torch.from_numpy(y), len(LETTERS)).float()
    pos = t.sum(0)
    pw = ((len(y) - pos) / pos.clamp_min(1)).clamp_max(1e3)
    coef = pw * t + 1 - t
    Wb = torch.zeros(xs.shape[1], len(LETTERS))
    m1, m2 = torch.zeros_like(Wb), torch.zeros_like(Wb)
    b1, b2 = 0.9, 0.999
    for step in range(1, steps + 1):
        z = xs @ Wb
        g = xs.T @ (coef * torch.sigmoid(z) - pw * t) / t.numel()
        g[:-1] += weight_decay * Wb[:-1]
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        Wb -= lr * (m1 / (1 - b1**step)) / ((m2 / (1 - b2**step)).sqrt() + 1e-8)
    W, b = Wb[:-1].T.double(), Wb[-1].double()
    with torch.no_grad():
        W_raw = (W / sd).float()  # the same probe on raw activations
        b_raw = (b - (W / sd) @ mu).float()
        pred = (x_test @ W_raw.T + b_raw > 0).numpy()
    f1 = [_f1(pred[:, j], y_test == j) if (y_test == j).any() else float("nan") for j in range(len(LETTERS))]
    return Probes(W_raw, b_raw, f1)


def _logreg(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 30) -> np.ndarray:
    """Class-balanced L2 logistic regression by Newton's method: -> [k + 1] weights, bias last."""
    n = len(y)
    Xb = np.hstack([X, np.ones((n, 1))])
    n_pos = max(int(y.sum()), 1)
    sw = np.where(y, n / (2 * n_pos), n / (2 * max(n - n_pos, 1)))
    reg = np.full(Xb.shape[1], l2)
    reg[-1] = 0.0
    w = np.zeros(Xb.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(Xb @ w, -30, 30)))
        g = Xb.T @ (sw * (p - y)) + reg * w
        H = (Xb * (sw * p * (1 - p))[:, None]).T @ Xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(H, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w


def main_latents(a_train: np.ndarray, y_train: np.ndarray, a_test: np.ndarray, y_test: np.ndarray,
                 cfg: AbsorptionConfig) -> list[int]:
    """Columns of the dense codes [n, G] SAEBench would call the letter's main latents (see above).

    y_* are booleans (the letter or not).
    """
    if not y_train.any() or y_train.all():
        return []
    diff = a_train[y_train].mean(0) - a_train[~y_train].mean(0)
    ranked = np.argsort(-diff, kind="stable")[:cfg.max_k]
    ranked = ranked[diff[ranked] > 0]
    best, chosen = -1.0, []
    for k in range(1, len(ranked) + 1):
        cols = ranked[:k]
        w = _logreg(a_train[:, cols], y_train)
        f1 = _f1(a_test[:, cols] @ w[:-1] + w[-1] > 0, y_test)
        if not np.isfinite(f1) or f1 <= best + cfg.f1_jump:
            break
        best, chosen = f1, [int(c) for c in cols]
    return chosen


# --- absorption -------------------------------------------------------------------------------


class WordAbsorption(NamedTuple):
    full: np.ndarray
    """[n] bool: fully absorbed."""
    fraction: np.ndarray
    """[n] absorption fraction in [0, 1]."""


def absorption(act: np.ndarray, a: np.ndarray, dec_proj: np.ndarray, cos: np.ndarray, main: list[int],
               cfg: AbsorptionConfig) -> WordAbsorption:
    """Per word: act [n] = (x - b_dec).p, a [n, G] codes, dec_proj [G] = W_dec.p, cos [G] = cos(W_dec, p)."""
    c = a * dec_proj[None, :]
    is_main = np.zeros(a.shape[1], dtype=bool)
    is_main[main] = True
    main_proj = c[:, is_main].sum(1)
    cand = np.where((~is_main & (cos >= cfg.fraction_cos))[None, :] & (c > 0), c, 0.0)
    m = min(cfg.max_absorbers, cand.shape[1])
    absorbed = -np.sort(-cand, axis=1)[:, :m].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = absorbed / act
        part = np.minimum(absorbed, act - main_proj)
        frac = np.where((main_proj >= act) | ~(share >= cfg.proportion), 0.0,
                        np.where(main_proj <= 0, 1.0, np.clip(part / (part + main_proj), 0.0, 1.0)))
        top = np.argmax(c, axis=1)
        top_c = c[np.arange(len(c)), top]
        full = ((np.abs(a[:, is_main]) < 1e-8).all(1) & (cos[top] >= cfg.full_cos) & (act > 0)
                & (top_c / act >= cfg.proportion))
    return WordAbsorption(full, frac)


def dense_codes(indices: Tensor, values: Tensor, d_sae: int) -> np.ndarray:
    """[n, d_sae] float64 from sparse codes [n, k]."""
    out = torch.zeros(indices.shape[0], d_sae, dtype=torch.float64)
    out.scatter_(1, indices, values.double())
    return out.numpy()


def absorption_at(g: int, order: np.ndarray, task: LetterTask, a_train: np.ndarray, a_test: np.ndarray,
                  W_dec: Tensor, b_dec: Tensor, cfg: AbsorptionConfig) -> AbsorptionScore:
    """Absorption with only the latents order[:g] (dense codes a_* [n, d_sae], raw-scale W_dec, b_dec)."""
    cols = order[:g]
    at, ae = a_train[:, cols], a_test[:, cols]
    Wd = W_dec.double()[torch.from_numpy(cols)]
    rates, fracs, mains, words = [], [], [], 0
    for j in range(len(LETTERS)):
        f1 = task.probes.f1[j]
        if not (np.isfinite(f1) and f1 >= cfg.min_probe_f1):
            continue
        p = task.probes.W[j].double()
        p = p / p.norm()
        x_te = task.x_test.double()
        tp = (task.y_test == j) & ((x_te @ task.probes.W[j].double() + float(task.probes.b[j])) > 0).numpy()
        main = main_latents(at, task.y_train == j, ae, task.y_test == j, cfg)
        if not tp.any() or not main:
            continue
        dec_proj = (Wd @ p).numpy()
        cos = (dec_proj / Wd.norm(dim=1).clamp_min(1e-12).numpy())
        act = ((x_te[tp] - b_dec.double()) @ p).numpy()
        r = absorption(act, ae[tp], dec_proj, cos, main, cfg)
        rates.append(float(r.full.mean()))
        fracs.append(float(r.fraction.mean()))
        mains.append(len(main))
        words += int(tp.sum())
    nan = float("nan")
    return AbsorptionScore(g, float(np.mean(rates)) if rates else nan, float(np.mean(fracs)) if fracs else nan,
                           len(rates), float(np.mean(mains)) if mains else nan, words)
