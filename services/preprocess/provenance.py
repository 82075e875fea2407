"""Where a dataset came from, for manifest.json: source URI, generation, sha256 of the input, legal
basis / consent reference, config hash.

The legal basis travels with the drop. Our ObjectStore port has no custom object metadata, so a
drop with `ftpipe drop --legal-basis TEXT` first writes a sidecar object
`incoming/<recipe>/<file>.legal.json` ({"legal_basis": TEXT, ...}) and then the data file; the
upload handler reads the sidecar into the JobSubmitted `source` dict (`source["legal_basis"]`),
which the job copies into the manifest. A job submitted directly can put `legal_basis` in its
source dict the same way. The sidecar works for any tool that drops files into the bucket (write
it before the data file) and stays auditable beside the input.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.domain.recipe import Recipe
from shared.platform.storage import file_sha256

LEGAL_SUFFIX = ".legal.json"


def sidecar_name(object_name: str) -> str:
    return object_name + LEGAL_SUFFIX


def is_sidecar(object_name: str) -> bool:
    return object_name.endswith(LEGAL_SUFFIX)


def describe_source(source: dict[str, Any], local: Path | None, recipe: Recipe) -> dict[str, Any]:
    """Manifest fields about the input (a local path is hashed here, streamed)."""
    sha = None
    if local is not None and local.is_file():
        sha = file_sha256(local)
    uri = source.get("uri")
    if uri is None and source.get("bucket") and (source.get("object") or source.get("name")):
        uri = f"gs://{source['bucket']}/{source.get('object') or source.get('name')}"
    return {
        "source_uri": uri or source.get("file") or source.get("submitted"),
        "source_generation": source.get("generation"),
        "input_sha256": sha,
        "legal_basis": source.get("legal_basis"),
        "config_hash": recipe.hash,
    }


def legal_basis_problem(recipe: Recipe, source: dict[str, Any]) -> str | None:
    """Why the dataset must be rejected for want of a legal basis, or None."""
    if not recipe.data.require_legal_basis:
        return None
    basis = source.get("legal_basis")
    if isinstance(basis, str) and basis.strip():
        return None
    return ("the recipe requires a legal basis / consent reference (data.require_legal_basis) and the drop "
            "carries none; drop again with `ftpipe drop FILE --recipe R --legal-basis TEXT` (or write "
            f"<object>{LEGAL_SUFFIX} with {{\"legal_basis\": ...}} before the data file)")
