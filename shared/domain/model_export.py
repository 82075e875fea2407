"""Export a registered version for serving (`ftpipe models export`):

<out>/merged/    the base model with the adapter merged into its weights (PEFT merge_and_unload),
                 saved as safetensors with its tokenizer: loads with `AutoModel*.from_pretrained`
                 and serves like any model (`vllm serve <out>/merged`)
<out>/adapter/   the LoRA adapter as vLLM's LoRA support loads it: adapter_config.json and
                 adapter_model.safetensors at the folder root
                 (`vllm serve BASE --enable-lora --lora-modules NAME=<out>/adapter`)
<out>/export.json  what was exported from which version, with the sha256 of every file written,
                 and `vllm`: the exact `vllm serve` commands for both folders

The adapter files and the bundle.json are checked against the digests the registry recorded in the
version's document (not against the bundle, which whoever writes the bucket could rewrite along with
the adapter), and the base model against the content hash the trainer recorded: a merge onto other
weights than the ones the adapter was trained on would be silently wrong.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from shared.domain.model_registry import ADAPTER_DIR, AWAITING_VERDICT, BUNDLE, RegistryError, get_version
from shared.domain.models import ModelNotAvailable, base_model_identity, resolve_model
from shared.platform.ports import ObjectNotFound
from shared.platform.storage import file_sha256

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
LABELS_FILE = "labels.json"   # a classifier's label of each class index (services/trainer/modeling.py)
# The tensor names vLLM's LoRA loader parses (vllm/lora/utils.py: parse_fine_tuned_lora_name).
# The only values vLLM's --max-lora-rank takes (vllm/config/lora.py: MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_VLLM_TENSOR = re.compile(r"^base_model\.model\..+\.(lora_[AB]\.weight|lora_embedding_[AB])$")


class ExportError(RuntimeError):
    """A version that cannot be exported in the asked form; the message says why and what to do."""


class IntegrityError(ExportError):
    """A version whose bucket copy is not what the registry recorded: a file altered or missing
    (`unsealed` False), or no digests recorded to check it against (`unsealed` True)."""

    def __init__(self, message: str, *, unsealed: bool = False):
        super().__init__(message)
        self.unsealed = unsealed


def export_version(store, docs, name: str, version: str, out_dir: Path, *, merged: bool = True,
                   adapter: bool = True) -> dict:
    """Export version `version` of model `name` into `out_dir` (see the module docstring)."""
    doc = get_version(docs, name, version)
    if doc["status"] == "quarantined":
        raise RegistryError(409, f"{name} {version} is quarantined: it must not be served, so it is not exported")
    if doc["status"] in AWAITING_VERDICT:
        raise RegistryError(409, f"{name} {version} is {doc['status']}: the gate has not decided on it (its evaluation "
                                 f"errored), so it is not exported; `ftpipe models reevaluate {name} {version}`")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} is not empty: export into a new folder")
    with tempfile.TemporaryDirectory(prefix="ftpipe-export-") as tmp:
        source = Path(tmp) / "adapter"
        bundle = fetch_adapter(store, doc, source)
        recipe = bundle["recipe"]
        kind = recipe["adapter"]["kind"]
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {"name": name, "version": version, "run_id": bundle["run_id"], "base_model": bundle["base_model"],
                  "base_model_sha256": bundle["base_model_sha256"], "adapter_kind": kind}
        if adapter and kind != "full":
            result["adapter"] = str(vllm_adapter(source, out_dir / "adapter"))
        if merged:
            result["merged"] = str(merge(bundle["base_model"], source, out_dir / "merged", task=recipe["task"],
                                         base_sha256=bundle["base_model_sha256"]))
    result["vllm"] = vllm_commands(result, name, version)
    result["files"] = {str(p.relative_to(out_dir)): file_sha256(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    (out_dir / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def fetch_adapter(store, doc: dict, dest: Path) -> dict:
    """Download version `doc`'s adapter files (`adapter/…`) into `dest`, each checked against the
    sha256 and size the registry recorded in the version's document (`adapter_files`), and its
    bundle.json against `bundle_sha256`; returns the bundle. Exporting and serving both go through
    here, so neither ever uses files that were altered after registration. IntegrityError where a
    file differs or is missing, or where the document holds no digests (a version registered before
    they were recorded, until an admin seals it: `ftpipe models seal`)."""
    name, version = doc["name"], doc["version"]
    files, bundle_sha256 = doc.get("adapter_files"), doc.get("bundle_sha256")
    if not files or not bundle_sha256:
        raise IntegrityError(
            f"{name} {version} has no digests in the registry (it was registered before ftpipe recorded them), so its "
            "files in the bucket cannot be told from altered ones and are not used; an admin who has checked them "
            f"records them with `ftpipe models seal {name} {version}`", unsealed=True)
    bucket, prefix = store.parse_url(doc["uri"])
    prefix = prefix.rstrip("/") + "/"
    raw = _read(store, bucket, prefix + BUNDLE, name, version)
    _check(store.url(bucket, prefix + BUNDLE), hashlib.sha256(raw).hexdigest(), len(raw), bundle_sha256, None,
           name, version)
    dest = Path(dest)
    for entry in files:
        rel = PurePosixPath(entry["name"])
        if not entry["name"].startswith(ADAPTER_DIR) or ".." in rel.parts or rel.is_absolute():
            raise IntegrityError(f"{name} {version}'s registry record names {entry['name']!r}, not a file of its "
                                 "adapter folder: the document is damaged; do not serve it")
        path = dest.joinpath(*rel.parts[1:])
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download_file(bucket, prefix + entry["name"], str(path))
        except ObjectNotFound:
            raise IntegrityError(f"{store.url(bucket, prefix + entry['name'])} is missing from the bucket: {name} "
                                 f"{version}'s copy was altered after registration; do not serve it") from None
        _check(store.url(bucket, prefix + entry["name"]), file_sha256(path), path.stat().st_size, entry["sha256"],
               entry.get("size"), name, version)
    return json.loads(raw)


def _read(store, bucket: str, obj: str, name: str, version: str) -> bytes:
    try:
        return store.read(bucket, obj)
    except ObjectNotFound:
        raise IntegrityError(f"{store.url(bucket, obj)} is missing from the bucket: {name} {version}'s copy was "
                             "altered after registration (or deleted); do not serve it") from None


def _check(url: str, sha256: str, size: int, want_sha256: str, want_size: int | None, name: str, version: str) -> None:
    if sha256 != want_sha256 or (want_size is not None and size != want_size):
        raise IntegrityError(f"{url} was altered after registration: its sha256 {sha256[:16]}… ({size} bytes) is not "
                             f"the {want_sha256[:16]}… the registry recorded for {name} {version}; do not serve it "
                             "(restore the registered copy, or register a new version)")


def vllm_commands(result: dict, name: str, version: str) -> dict:
    """The commands that serve an export with vLLM: the merged folder on its own, and the adapter on
    the base model under the name `ftpipe serve` gives it (NAME@VERSION), so clients need not
    change. vLLM refuses an adapter whose rank exceeds --max-lora-rank (default 16), so it is set
    from the adapter's own config."""
    out = {}
    if "merged" in result:
        out["merged"] = f"vllm serve {result['merged']} --served-model-name {name}@{version}"
    if "adapter" in result:
        rank = json.loads((Path(result["adapter"]) / ADAPTER_CONFIG).read_text())["r"]
        base = resolve_model(result["base_model"])
        out["adapter"] = (f"vllm serve {base} --enable-lora --max-lora-rank {_vllm_rank(rank)} "
                          f"--lora-modules {name}@{version}={result['adapter']}")
    return out


def _vllm_rank(rank: int) -> int:
    """The smallest value vLLM's --max-lora-rank accepts that holds `rank`."""
    return next(r for r in VLLM_MAX_LORA_RANKS if r >= rank)


def vllm_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Copy a PEFT LoRA adapter into `out_dir` in the layout vLLM loads, after checking that vLLM
    can load it: a LoRA (or QLoRA: the same weights) config without DoRA or extra trained modules,
    and tensors named as vLLM's loader parses them."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config_path, weights = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights.is_file():
        raise ExportError(f"{adapter_dir} has no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}: not a PEFT adapter "
                          "saved with safetensors")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA":
        raise ExportError(f"the adapter is {config.get('peft_type')}, and vLLM serves LoRA adapters only: export "
                          "the merged weights instead (or train with adapter.kind lora / qlora)")
    if config.get("r", 0) > VLLM_MAX_LORA_RANKS[-1]:
        raise ExportError(f"the adapter's rank {config['r']} exceeds vLLM's largest --max-lora-rank "
                          f"({VLLM_MAX_LORA_RANKS[-1]}): export the merged weights instead")
    if config.get("use_dora"):
        raise ExportError("the adapter uses DoRA, which vLLM does not load: export the merged weights instead")
    if config.get("modules_to_save"):
        raise ExportError(f"the adapter trains whole modules besides LoRA ({config['modules_to_save']}, e.g. a "
                          "classifier head), which vLLM's LoRA support does not load: export the merged weights instead")
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        odd = [name for name in f.keys() if not _VLLM_TENSOR.match(name)]
    if odd:
        raise ExportError(f"{weights} holds tensors vLLM cannot place: {odd[:5]}; export the merged weights instead")
    out_dir.mkdir(parents=True, exist_ok=False)
    shutil.copyfile(config_path, out_dir / ADAPTER_CONFIG)
    shutil.copyfile(weights, out_dir / ADAPTER_WEIGHTS)
    return out_dir


def merge(base_model: str, adapter_dir: Path, out_dir: Path, *, task: str = "chat_sft",
          base_sha256: str | None = None) -> Path:
    """The base model with the adapter merged into its weights, saved as safetensors with the
    tokenizer into `out_dir`. An adapter folder that holds a whole model (adapter.kind full) is saved
    as it is. `base_sha256`: the content hash the trainer recorded; the base must still match it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    try:
        base_path = resolve_model(base_model)
    except ModelNotAvailable as exc:
        raise ExportError(f"base model {base_model!r}: {exc}") from exc
    if base_sha256 is not None:
        found = base_model_identity(base_model)["sha256"]
        if found != base_sha256:
            raise ExportError(f"base model {base_model!r} ({base_path}) has content hash {found}, but the adapter was "
                              f"trained on {base_sha256}: the reference now names other weights; put the original "
                              "weights back (bundle.json lists each file's sha256 in base_model_files)")
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    kwargs: dict = {"dtype": torch.float32}   # the trainer's precision: the merge adds no rounding of its own
    labels_path = adapter_dir / LABELS_FILE
    if labels_path.is_file():
        labels = json.loads(labels_path.read_text())
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    whole = not (adapter_dir / ADAPTER_CONFIG).is_file()
    model = auto.from_pretrained(adapter_dir if whole else base_path, **kwargs)
    if not whole:
        from peft import PeftModel

        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        if config.get("peft_type") != "LORA":
            raise ExportError(f"a {config.get('peft_type')} adapter has no weights to merge into the base (only LoRA "
                              "and QLoRA adapters do): serve it with PEFT on the base model")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    tokenizer_source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    out_dir.mkdir(parents=True, exist_ok=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(out_dir)
    if labels_path.is_file():
        shutil.copyfile(labels_path, out_dir / LABELS_FILE)
    return out_dir
