"""progsae clients: `Client` (blocking) and `AsyncClient` (asyncio), numpy in and out."""

from typing import TYPE_CHECKING

from .types import ProgsaeError

if TYPE_CHECKING:  # imported on first use (below), so `import progsae.clients` stays light
    from .aio import AsyncClient
    from .client import Client

__all__ = ["Client", "AsyncClient", "ProgsaeError"]


def __getattr__(name: str) -> type:
    if name == "Client":
        from .client import Client

        return Client
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(name)
