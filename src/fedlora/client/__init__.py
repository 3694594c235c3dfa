"""Client-side work: the local training loop and one client's turn in a round."""

from fedlora.client.train import TrainSettings, client_round, train_local

__all__ = ["TrainSettings", "client_round", "train_local"]
