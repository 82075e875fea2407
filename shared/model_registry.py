"""Where the registry keeps its documents, read by the services and the CLI that need them."""
from __future__ import annotations

MODELS = "models"                  # models/{name}: version counter, aliases
MODEL_VERSIONS = "model_versions"  # model_versions/{name}@{version}: one registered version


def alias_version(docs, name: str, alias: str = "production") -> dict | None:
    """The version document `alias` points at for model `name`, or None."""
    version = ((docs.get(MODELS, name) or {}).get("aliases") or {}).get(alias)
    return docs.get(MODEL_VERSIONS, f"{name}@{version}") if version else None
