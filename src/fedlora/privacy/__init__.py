"""Differential privacy: user-level DP of federated rounds (clip each client's update, Gaussian noise on the server
or on each client, client sampling) with an accountant (:mod:`fedlora.privacy.accounting`, Google's
``dp_accounting``: RDP and PLD), and sample-level DP-SGD in the client loop (:mod:`fedlora.privacy.dpsgd`).

Importing this package is cheap: ``dp_accounting`` (and opacus, for DP-SGD) are imported where they are used.
"""

from fedlora.privacy.user_level import (
    NOISE_AT,
    SAMPLINGS,
    UserLevelDP,
    clip_update,
    noisy_mean,
    privatize_upload,
    server_noise_refusal,
    update_delta,
    update_norm,
)

__all__ = [
    "NOISE_AT",
    "SAMPLINGS",
    "UserLevelDP",
    "clip_update",
    "noisy_mean",
    "privatize_upload",
    "server_noise_refusal",
    "update_delta",
    "update_norm",
]
