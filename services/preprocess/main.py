"""Entrypoint of the preprocess container (Dataproc driver / local process)."""
from shared.platform.main import serve

from services.preprocess.service import SERVICE

if __name__ == "__main__":
    serve(SERVICE)
