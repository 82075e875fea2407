"""Entrypoint of the serving container (Cloud Run or GKE); locally `ftpipe serve`. Configuration:
services/serving/server.py."""
from shared.platform.config import Settings

from services.serving.server import ServingConfig, serve

if __name__ == "__main__":
    settings = Settings.from_env()
    serve(settings, ServingConfig.from_env(settings))
