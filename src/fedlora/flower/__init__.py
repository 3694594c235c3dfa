"""fedlora on Flower: a ServerApp that runs fedlora's run loop and a ClientApp that runs its client code.

Flower is optional (``pip install 'fedlora[flower]'``): nothing outside this package imports it. The app objects
are ``fedlora.flower.app:server_app`` and ``fedlora.flower.app:client_app``; ``flower/pyproject.toml`` in the
repository is the Flower app that names them.
"""
