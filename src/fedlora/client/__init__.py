"""Client-side work: the local training loop, objectives, upload codecs and one client's turn in a round."""

from __future__ import annotations

from typing import Any

__all__ = ["TrainSettings", "client_round", "train_local"]


def __getattr__(name: str) -> Any:  # lazy: methods import client.objectives without pulling the loop in
    if name in __all__:
        from fedlora.client import train

        return getattr(train, name)
    raise AttributeError(name)
