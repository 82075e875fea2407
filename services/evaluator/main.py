"""Entrypoint of the evaluator as a pull subscriber (locally, or any always-on container); on
Cloud Run it takes Pub/Sub pushes instead: services/evaluator/app.py."""
from shared.platform.main import serve

from services.evaluator.service import SERVICE

if __name__ == "__main__":
    serve(SERVICE)
