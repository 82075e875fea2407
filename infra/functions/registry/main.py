"""The registry's Cloud Functions source root: Cloud Functions (2nd gen) loads `main.py` and calls
the entry point the deployment names (infra/terraform/functions.tf): `on_evaluation` for the
Eventarc trigger on `evaluations`, `approve` for the HTTP approval. cloudbuild.yaml zips this file,
requirements.txt, shared/ and services/registry_fn/ into registry-fn.zip."""
from services.registry_fn.main import approve, on_evaluation

__all__ = ["approve", "on_evaluation"]
