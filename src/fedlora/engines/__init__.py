"""Engines move data between the round logic and the clients; the local engine simulates them in-process."""

from fedlora.engines.local import ClientSplits, LocalEngine

__all__ = ["ClientSplits", "LocalEngine"]
