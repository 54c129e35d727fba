"""progsae clients: `Client` (blocking) and `AsyncClient` (asyncio), numpy in and out."""

from .types import ProgsaeError

__all__ = ["Client", "AsyncClient", "ProgsaeError"]


def __getattr__(name: str):
    if name == "Client":
        from .client import Client

        return Client
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)
