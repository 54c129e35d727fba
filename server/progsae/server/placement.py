"""Models placed, not copied everywhere: a byte budget per replica, and direct-port calls for a model
the replica does not hold sent on to one that does, by Serve's own multiplexed router.

* **Bytes, not counts.** serve.multiplexed keeps each replica's loaded models in an LRU and tells
  Serve's router which replica holds which model; it bounds the LRU by count. `make_room` bounds it
  by bytes (`AppConfig.model_memory_bytes`): before a load it unloads the least recently used models
  until the new one fits, through the LRU's own `unload_model_lru`, and a model larger than the whole
  budget is refused (RESOURCE_EXHAUSTED) instead of evicting everything.
* **Calls go where the model is.** A client of the replicas' own port reaches whichever replica the
  kernel or its round robin picked, so without placement every replica would load every model it is
  asked for. Such a call for a model this replica does not hold, and could load only by unloading
  another (its byte budget is full), is sent on through a DeploymentHandle with `multiplexed_model_id`:
  Serve's router sends it to a replica that holds the model (or, when none does, to the least loaded
  one, which loads it). The forwarding replica authorised the call; the target serves it as a
  `ForwardedCall`. Calls through Serve's proxy are routed so already. While a model fits beside the
  ones held, it is loaded where the call landed: a hot model is copied onto the replicas a scale-up
  adds, and they share its load (sent on, every call would go to its one holder).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .call import Call
from .errors import ServiceError, Status, exhausted, internal
from .ray_proxy import LOST_REPLICA, is_lost_replica
from .registry import ModelRef, ServedModel
from .servicer import NotRouted

T = TypeVar("T")


class ForwardedCall(Call):
    """A call another replica of this deployment authorised and sent on (a DeploymentHandle call)."""

    transport = "forwarded"
    trusted = True

    def __init__(self, timeout_s: float | None):
        super().__init__()
        self._end = None if timeout_s is None else time.perf_counter() + timeout_s

    def time_remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.perf_counter())


async def make_room(lru: Any, need: int, budget: int, model_id: str) -> None:
    """Unload serve.multiplexed's least recently used models until `need` more bytes fit `budget`."""
    if need > budget:
        raise exhausted(f"model {model_id} needs {need / 2**20:,.0f} MiB of weights; this replica holds at most "
                        f"{budget / 2**20:,.0f} MiB of models (model_memory_bytes)")
    models: Mapping[str, ServedModel] = lru.models
    while models and sum(m.nbytes for m in models.values()) + need > budget:
        await lru.unload_model_lru()
        lru._push_multiplexed_replica_info = True  # Serve's router learns the model left (as its count LRU does)


class HandleForwarder:
    """Sends direct-port calls for models held elsewhere through this deployment's handle.

    Ray is waited on for at most `wait_s` where all is well in milliseconds, so that a forwarded call
    never waits longer than it would on its own replica:
    * Serve's router placing the call on a replica (a fresh replica's router may not know the
      deployment's replicas yet): past it, NotRouted, and the call is served here, loading its model;
    * fetching a stream item the target has produced (its node died, and Ray holds the item's fetch
      until it declares the node dead, tens of seconds later): past it, UNAVAILABLE, which the
      project's clients retry or resume. Measured: tests/integration/test_ray_node_failure.py.
    The call's deadline bounds the rest (grpc.aio cancels the call there, and the forwarded one with it)."""

    def __init__(self, handle: Callable[[], Any], held: Callable[[], Mapping[str, ServedModel]],
                 need: Callable[[ModelRef], int], budget: int, wait_s: float = 2.0):
        self._handle, self._held, self._need, self.budget, self.wait_s = handle, held, need, budget, wait_s

    def wants(self, spec: ModelRef, call: Call) -> bool:
        """A direct-port call for a model this replica does not hold, and could hold only by unloading
        another: while the model fits beside the ones held, it is loaded here instead, so that a hot
        model is copied onto the replicas a scale-up adds and they share its load."""
        if call.transport != "direct":
            return False
        held = self._held()
        return spec.id not in held and sum(m.nbytes for m in held.values()) + self._need(spec) > self.budget

    async def unary(self, method: str, request: Any, spec: ModelRef, call: Call) -> Any:
        response = self._handle().options(multiplexed_model_id=spec.id).forwarded.remote(
            method, request, call.time_remaining())
        ref = await self._routed(response._to_object_ref(), response, call)
        try:
            return await ref
        except BaseException as e:
            response.cancel()
            if isinstance(e, Exception):
                raise _unwrap(e) from None
            raise

    async def stream(self, method: str, request: Any, spec: ModelRef, call: Call) -> AsyncGenerator[Any, None]:
        response = self._handle().options(multiplexed_model_id=spec.id, stream=True).forwarded_stream.remote(
            method, request, call.time_remaining())
        refs = await self._routed(response._to_object_ref_gen(), response, call)
        sent = 0
        try:
            async for ref in refs:
                try:
                    item = await asyncio.wait_for(ref, self.wait_s)
                except TimeoutError:
                    raise ServiceError(Status.UNAVAILABLE, LOST_REPLICA.format(
                        f"item {sent + 1} of the replica it was sent on to not fetched in {self.wait_s:g} s")) from None
                yield item
                sent += 1
        except Exception as e:  # noqa: BLE001  (mapped to one status)
            raise _unwrap(e) from None
        finally:
            response.cancel()

    async def _routed(self, assigned: Awaitable[T], response: Any, call: Call) -> T:
        """`assigned` (the handle call placed on a replica) within wait_s, else NotRouted."""
        left = call.time_remaining()
        try:
            return await asyncio.wait_for(assigned, self.wait_s if left is None else min(self.wait_s, left))
        except TimeoutError:
            response.cancel()
            raise NotRouted from None
        except Exception as e:  # noqa: BLE001
            raise _unwrap(e) from None


def _unwrap(e: BaseException) -> ServiceError:
    """The status the target answered (Ray wraps it in a RayTaskError), UNAVAILABLE for a lost replica."""
    if isinstance(e, ServiceError):
        return e
    cause = getattr(e, "cause", e)
    if isinstance(cause, ServiceError):
        return ServiceError(cause.status, cause.message)
    if is_lost_replica(e):
        return ServiceError(Status.UNAVAILABLE, LOST_REPLICA.format(type(e).__name__))
    return internal(e)
