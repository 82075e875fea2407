"""The domain: the event contracts, recipes and the operations on runs, datasets and models that
more than one service (or the CLI) performs (README.md)."""
