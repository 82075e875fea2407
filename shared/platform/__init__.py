"""The platform: how a service starts, receives and publishes messages, stores objects and documents,
retries and authenticates, the same in the cloud and on one machine (README.md)."""
