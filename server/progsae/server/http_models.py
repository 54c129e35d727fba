"""The HTTP API's request bodies, typed: FastAPI validates each route's JSON against these models before
the route runs, and a body that does not fit answers INVALID_ARGUMENT naming the field (http_api's
handler), never INTERNAL and never a silent conversion (`"text": ["a", "b"]` is refused, not sent as
the string "['a', 'b']"). Unknown fields are refused too, so a misspelt budget key is an error, not a
budget quietly ignored. Values are range-checked by the servicer, as for gRPC.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(Body):
    """A stream's budget (proto Budget): every field optional."""

    max_granularity: int | None = None
    deadline_ms: int | None = None
    target_fvu: float | None = None
    token_target_fvu: float | None = None
    max_k: int | None = None
    token_target_kl: float | None = None
    """Per-token KL budget, nats (text streams; turns `kl` on)."""


class StreamBody(Body):
    """POST /api/stream (and GET's query): a text or activations, a budget, ladders, an axis."""

    model_id: StrictStr = ""
    also_models: list[StrictStr] = Field(default_factory=list, max_length=7)
    """Text streams: more models of the same language model, streamed after model_id's from the same
    one pass of it; every event then carries `stream` (0 = model_id, i = also_models[i - 1])."""
    text: StrictStr | None = None
    activations: list[list[float]] | None = None
    budget: Budget = Field(default_factory=Budget)
    ladder: list[int] = Field(default_factory=list)
    k_ladder: list[int] = Field(default_factory=list)
    axis: Literal["g", "k"] = "g"
    top: int = Field(8, ge=0, le=256)
    """New latents per token per rung in each event."""
    max_tokens: int = Field(0, ge=0)
    kl: StrictBool = False
    """Text streams: each rung's KL and top-1 agreement of the next-token prediction per token (Fidelity)."""
    predictions: int = Field(0, ge=0, le=20)
    """Text streams: also the n most probable next tokens per token, and the clean ones on the first rung."""


class EncodeBody(Body):
    model_id: StrictStr = ""
    activations: list[list[float]]
    prefix_granularity: int | None = None


class TokenCodes(Body):
    indices: list[int]
    values: list[float]


class DecodeBody(Body):
    model_id: StrictStr = ""
    codes: list[TokenCodes]
    granularity: int


class EncodeTextBody(Body):
    model_id: StrictStr = ""
    text: StrictStr
    max_tokens: int = Field(0, ge=0)
    include_activations: StrictBool = False


class EncodeTextsBody(Body):
    model_ids: list[StrictStr] = []
    texts: list[StrictStr] = Field(min_length=1)
    max_tokens: int = Field(0, ge=0)
    include_activations: StrictBool = False
