"""Entrypoint of the evaluator: the pull subscriber locally (Cloud Run's push endpoint comes with
the evaluator's deployment work)."""
from shared.main import serve

from services.evaluator.service import SERVICE

if __name__ == "__main__":
    serve(SERVICE)
