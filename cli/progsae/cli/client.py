"""`progsae client ...`: the light client's own command (progsae.clients.cli, which the
progsae-client distribution ships without this package), registered here as is."""

from progsae.clients.cli import HELP, configure

__all__ = ["HELP", "configure"]
