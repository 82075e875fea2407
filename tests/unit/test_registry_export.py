"""Exporting a registered version (shared/domain/model_export.py) of a real LoRA adapter on the tiny random
model: merged safetensors weights whose logits are the adapter-on-base logits, and the adapter in the
layout vLLM loads; integrity checks against the bundle and the base model's recorded hash."""
import hashlib
import json
import logging

import pytest
import torch

from ftpipe.cli import main
from shared.domain import model_registry as reg
from shared.domain.model_export import ExportError, IntegrityError, export_version, merge, vllm_adapter
from shared.domain.models import TINY, base_model_identity, resolve_model
from shared.platform.runtime import Context
from shared.platform.storage import upload_dir
from tests.unit.governance import ADMIN, own
from tests.unit.test_registry import BUCKET, RECIPE, RUN_RECORD, SCORES, write_dataset, write_report

from services.registry_fn.service import register

NAME = RECIPE.model_name
VLLM_NAMES = r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.weight$"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA adapter of the tiny model with random A and B (an initial adapter, B = 0, would merge
    into the base unchanged and prove nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("lora")
    peft_model.save_pretrained(out)
    return out


def registered(adapters, lora, run_id="run-x", passed=True) -> str:
    own(adapters.docs, RECIPE)
    """The adapter trained by `run_id`, registered by the registry's handler; returns its version."""
    import shared.domain.events as ev

    upload_dir(adapters.store, lora, BUCKET, f"runs/{run_id}/adapter")
    record = {**RUN_RECORD, "base_model": base_model_identity(TINY)}
    adapters.store.write(BUCKET, f"runs/{run_id}/adapter/run_record.json", json.dumps(record).encode())
    event = ev.EvaluationCompleted(run_id=run_id, recipe=RECIPE, dataset_uri=write_dataset(adapters),
                                   adapter_uri=adapters.store.url(BUCKET, f"runs/{run_id}/adapter/"), scores=SCORES,
                                   passed=passed, reasons=[], report_uri=write_report(adapters, run_id))
    register(event, Context("registry", adapters, None, None, logging.LoggerAdapter(logging.getLogger("t"), {})))
    return adapters.docs.get(reg.MODELS, NAME)["runs"][run_id]


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Where is my order?", "Refund, please."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_export_merged_weights_equal_the_adapter_on_the_base_and_the_adapter_is_vllm_shaped(adapters, lora, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = registered(adapters, lora)
    out = tmp_path / "export"
    result = export_version(adapters.store, adapters.docs, NAME, version, out)

    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    assert names and all(__import__("re").match(VLLM_NAMES, n) for n in names), names[:3]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    merged_dir = out / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32).eval()
    base_logits = logits(base, tokenizer)
    on_base = PeftModel.from_pretrained(base, str(lora)).eval()
    expected = logits(on_base, tokenizer)
    assert not torch.allclose(expected, base_logits, atol=1e-3)   # the adapter changes the model…
    torch.testing.assert_close(logits(merged, tokenizer), expected, atol=1e-5, rtol=1e-5)   # … and merging keeps it

    manifest = json.loads((out / "export.json").read_text())
    assert manifest["version"] == version and manifest["base_model_sha256"] == base_model_identity(TINY)["sha256"]
    assert set(manifest["files"]) >= {"adapter/adapter_model.safetensors", "merged/model.safetensors"}
    assert result["merged"] == str(merged_dir)
    # r = 4 fits vLLM's smallest --max-lora-rank above it (8); the name is the one `ftpipe serve` uses.
    assert manifest["vllm"] == {
        "merged": f"vllm serve {merged_dir} --served-model-name {NAME}@{version}",
        "adapter": f"vllm serve {resolve_model(TINY)} --enable-lora --max-lora-rank 8 "
                   f"--lora-modules {NAME}@{version}={out / 'adapter'}"}


def test_export_refuses_what_must_not_be_served_or_was_altered(adapters, lora, tmp_path):
    version = registered(adapters, lora)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ExportError, match="is not empty"):
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "full")
    with pytest.raises(reg.RegistryError, match="has no version '4.4'"):
        export_version(adapters.store, adapters.docs, NAME, "4.4", tmp_path / "a")

    weights = f"models/{NAME}/{version}/adapter/adapter_model.safetensors"
    original = adapters.store.read(BUCKET, weights)
    adapters.store.write(BUCKET, weights, original[:-8] + b"\0" * 8)
    with pytest.raises(ExportError, match="adapter_model.safetensors was altered after registration"):
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "b", merged=False)
    adapters.store.write(BUCKET, weights, original)

    bad = registered(adapters, lora, run_id="run-bad", passed=False)
    with pytest.raises(reg.RegistryError, match="quarantined: it must not be served") as exc:
        export_version(adapters.store, adapters.docs, NAME, bad, tmp_path / "c")
    assert exc.value.status == 409

    with pytest.raises(ExportError, match="the reference now names other weights"):
        merge(TINY, lora, tmp_path / "d", base_sha256="0" * 64)


def tamper(adapters, version: str) -> None:
    """What a writer of the bucket (not of the registry) can do: other adapter weights, and a
    bundle.json rewritten to list their sha256, consistent with each other."""
    prefix = f"models/{NAME}/{version}/"
    weights = adapters.store.read(BUCKET, prefix + "adapter/adapter_model.safetensors")
    altered = weights[:-8] + b"\1" * 8
    adapters.store.write(BUCKET, prefix + "adapter/adapter_model.safetensors", altered)
    bundle = json.loads(adapters.store.read(BUCKET, prefix + "bundle.json"))
    for entry in bundle["files"]:
        if entry["name"] == "adapter/adapter_model.safetensors":
            entry.update(sha256=hashlib.sha256(altered).hexdigest(), size=len(altered))
    adapters.store.write(BUCKET, prefix + "bundle.json", json.dumps(bundle, indent=2).encode())


def test_an_adapter_rewritten_with_its_bundle_in_the_bucket_is_refused(adapters, lora, tmp_path):
    version = registered(adapters, lora)
    untouched = registered(adapters, lora, run_id="run-y")
    prefix = f"models/{NAME}/{version}/"
    original = adapters.store.read(BUCKET, prefix + "bundle.json")
    tamper(adapters, version)
    with pytest.raises(IntegrityError, match=r"bundle\.json was altered after registration: its sha256") as exc:
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "a", merged=False)
    assert not exc.value.unsealed and f"the registry recorded for {NAME} {version}" in str(exc.value)
    # The registry's own digest of each adapter file decides, not the bundle: with the registered
    # bundle.json back, the weights are still caught.
    adapters.store.write(BUCKET, prefix + "bundle.json", original)
    with pytest.raises(IntegrityError, match=r"adapter/adapter_model\.safetensors was altered after registration"):
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "b", merged=False)
    adapters.store.delete(BUCKET, prefix + "adapter/adapter_config.json")
    with pytest.raises(IntegrityError, match=r"adapter_config\.json is missing from the bucket"):
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "c", merged=False)
    # Sealing does not accept what was altered after digests were recorded.
    with pytest.raises(reg.RegistryError, match="no longer matches them") as refused:
        reg.seal(adapters.docs, adapters.store, NAME, version, caller=ADMIN)
    assert refused.value.status == 409

    result = export_version(adapters.store, adapters.docs, NAME, untouched, tmp_path / "d", merged=False)
    assert (tmp_path / "d" / "adapter" / "adapter_model.safetensors").read_bytes() == (
        lora / "adapter_model.safetensors").read_bytes() and result["version"] == untouched
    doc = reg.seal(adapters.docs, adapters.store, NAME, untouched, caller=ADMIN)   # matches: nothing changes
    assert "sealed" not in doc


def test_a_version_registered_without_digests_is_refused_until_an_admin_seals_it(adapters, lora, tmp_path,
                                                                                 monkeypatch, capsys):
    version = registered(adapters, lora)
    key = reg.version_id(NAME, version)
    legacy = {k: v for k, v in adapters.docs.get(reg.MODEL_VERSIONS, key).items()
              if k not in ("adapter_files", "bundle_sha256")}
    adapters.docs.set(reg.MODEL_VERSIONS, key, legacy)
    with pytest.raises(IntegrityError, match="has no digests in the registry") as exc:
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "a", merged=False)
    assert exc.value.unsealed and f"`ftpipe models seal {NAME} {version}`" in str(exc.value)

    # A bucket copy that is not even consistent with its own bundle.json is not sealed.
    prefix = f"models/{NAME}/{version}/"
    weights = adapters.store.read(BUCKET, prefix + "adapter/adapter_model.safetensors")
    adapters.store.write(BUCKET, prefix + "adapter/adapter_model.safetensors", weights + b"\0")
    with pytest.raises(reg.RegistryError, match="does not describe the adapter files beside it"):
        reg.seal(adapters.docs, adapters.store, NAME, version, caller=ADMIN)
    adapters.store.write(BUCKET, prefix + "adapter/adapter_model.safetensors", weights)

    monkeypatch.setenv("FTPIPE_STATE", str(adapters.settings.state_dir))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["models", "seal", NAME, version]) == 0
        assert "sealed by token:stack" in capsys.readouterr().err
    finally:
        root.handlers[:], root.level = handlers, level
    doc = reg.get_version(adapters.docs, NAME, version)
    assert doc["sealed"]["actor"] == "token:stack" and doc["bundle_sha256"] == hashlib.sha256(
        adapters.store.read(BUCKET, prefix + "bundle.json")).hexdigest()
    export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "b", merged=False)
    tamper(adapters, version)   # from now on the sealed digests decide
    with pytest.raises(IntegrityError, match="was altered after registration"):
        export_version(adapters.store, adapters.docs, NAME, version, tmp_path / "c", merged=False)


def test_adapters_vllm_cannot_load_are_refused(tmp_path, lora):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).save_pretrained(
        tmp_path / "prefix")
    with pytest.raises(ExportError, match="vLLM serves LoRA adapters only"):
        vllm_adapter(tmp_path / "prefix", tmp_path / "out")
    with pytest.raises(ExportError, match="has no weights to merge"):
        merge(TINY, tmp_path / "prefix", tmp_path / "merged")

    head = tmp_path / "with-head"
    head.mkdir()
    config = json.loads((lora / "adapter_config.json").read_text())
    (head / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    (head / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ExportError, match="classifier head"):
        vllm_adapter(head, tmp_path / "out2")


def test_models_export_and_show_commands(adapters, lora, tmp_path, monkeypatch, capsys):
    version = registered(adapters, lora)
    monkeypatch.setenv("FTPIPE_STATE", str(adapters.settings.state_dir))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert main(["models", "export", NAME, version, "--out", str(tmp_path / "e"), "--no-merged", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["adapter"] == str(tmp_path / "e" / "adapter")
        assert not (tmp_path / "e" / "merged").exists()
        assert main(["models", "export", NAME, version, "--out", str(tmp_path / "e")]) == 2
        assert "is not empty: export into a new folder" in capsys.readouterr().err
        assert main(["models", "show", NAME, version]) == 0
        assert f"# {NAME} {version}" in capsys.readouterr().out
        assert main(["models", "show", NAME, version, "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["bundle"]["base_model_sha256"] == base_model_identity(TINY)["sha256"]
        assert shown["model_card"].startswith(f"# {NAME} {version}") and shown["aliases"] == ["production", "staging"]
    finally:
        root.handlers[:], root.level = handlers, level


def test_the_base_model_hash_covers_every_file_of_the_folder(tmp_path):
    """What the trainer records in the run record and the export checks (shared/domain/models.py)."""
    import hashlib
    import shutil

    tiny = base_model_identity(TINY)
    assert tiny["ref"] == TINY and tiny["files"]["model.safetensors"] == hashlib.sha256(
        (resolve_model(TINY) / "model.safetensors").read_bytes()).hexdigest()
    copy = tmp_path / "copy"
    shutil.copytree(resolve_model(TINY), copy)
    assert base_model_identity(str(copy))["sha256"] == tiny["sha256"]   # the content, not the folder's name
    (copy / "generation_config.json").write_text("{}")
    assert base_model_identity(str(copy))["sha256"] != tiny["sha256"]
    assert base_model_identity("org/not-downloaded")["sha256"] is None
