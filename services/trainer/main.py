"""Entrypoint of the trainer container (GKE GPU pod / local process)."""
from shared.platform.main import serve

from services.trainer.service import SERVICE

if __name__ == "__main__":
    serve(SERVICE)
