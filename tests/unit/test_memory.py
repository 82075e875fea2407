"""What the trainer does to hold less memory, shown to change nothing else: activation checkpointing
gives the same loss and gradients as keeping the activations (LoRA, QLoRA, prefix, full; packed
rows included) while saving less for the backward pass; the chunked LM head gives the same loss and
gradients as one head call while its peak memory no longer grows with the positions; the flash-attn
varlen layout of packed rows gives what the per-conversation loop gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from shared.domain.recipe import apply_overrides, load_recipe  # noqa: E402

from services.trainer import modeling, objectives  # noqa: E402
from services.trainer.compute import Compute  # noqa: E402

LOG = __import__("logging").getLogger("test")
ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _chat(i: int) -> dict:
    messages = []
    for t in range(1 + i % 3):
        messages += [{"role": "user", "content": f"Where is order {i}-{t}?" + " Please hurry." * (i % 4)},
                     {"role": "assistant", "content": f"Order {i} ships on day {(i + t) % 5 + 1}." + " Sorry." * (i % 3)}]
    return {"id": f"c{i}", "messages": messages}


def _loss_and_grads(recipe, tokenizer, *, checkpointing: bool) -> tuple[float, dict, int]:
    """One micro-batch's summed loss, the gradient of every trained parameter, and the bytes the
    forward saved for the backward pass, on a model built with checkpointing on or off."""
    torch.manual_seed(0)  # the same adapter initialisation in both models
    model = modeling.build_model(recipe, compute=Compute("fp32", "cpu", checkpointing))
    assert model.is_activation_checkpointing == checkpointing
    sft = objectives.ChatSFT(recipe, tokenizer)
    batch = sft.encode([_chat(i) for i in range(6)], "train", LOG)[:3]
    saved = []

    def keep(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    torch.manual_seed(1)  # the same dropout masks
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = sft.loss_sum(model, batch, CPU)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(saved)


@pytest.mark.parametrize("kind, packing", [("lora", False), ("lora", True), ("full", False), ("full", True),
                                           ("qlora", False), ("prefix", False)])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(kind, packing, tokenizer):
    recipe = apply_overrides(load_recipe("tiny-sft"), {"adapter.kind": kind, "training.packing": packing,
                                                      "training.max_seq_len": 160, "adapter.dropout": 0.1})
    kept_loss, kept, kept_bytes = _loss_and_grads(recipe, tokenizer, checkpointing=False)
    loss, grads, saved_bytes = _loss_and_grads(recipe, tokenizer, checkpointing=True)
    assert loss == pytest.approx(kept_loss, rel=1e-6)
    assert grads.keys() == kept.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, kept[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert saved_bytes < kept_bytes  # the layers' activations were not kept


def test_prefix_tuning_checkpoints_by_default_on_a_gpu_and_still_generates_as_without(tokenizer):
    from services.trainer.compute import resolve

    prefix = apply_overrides(load_recipe("tiny-sft"), {"adapter.kind": "prefix"})
    assert resolve(prefix, torch.device("cuda")).gradient_checkpointing is True
    # the read-only prefix cache is for training forwards: generation extends PEFT's cache as before
    prompt = tokenizer("Where is my order?", return_tensors="pt")
    outputs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = modeling.build_model(prefix, compute=Compute("fp32", "cpu", checkpointing))
        model.eval()
        outputs.append(model.generate(**prompt, max_new_tokens=8, do_sample=False).tolist())
    assert outputs[0] == outputs[1]


# ------------------------------------------------------------------ the LM head in chunks

def test_the_chunked_head_gives_the_loss_and_gradients_of_one_head_call(tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from shared.domain.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-smollm2"))  # every weight trains
    sft = objectives.ChatSFT(load_recipe("tiny-sft"), tokenizer)
    batch = sft.encode([_chat(i) for i in range(6)], "val", LOG)
    ids, labels = objectives._pad([e.input_ids for e in batch], 0), objectives._pad([e.labels for e in batch], -100)
    mask = objectives._pad([[1] * len(e.input_ids) for e in batch], 0)

    def run(chunk_elements: int | None):
        model.zero_grad()
        if chunk_elements is None:  # the whole head at once, over every position
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     labels[:, 1:].reshape(-1), reduction="sum")
        else:
            monkeypatch.setattr(objectives, "LOGITS_CHUNK", chunk_elements)
            loss = sft.loss_sum(model, batch, CPU)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    positions = sum(e.trained_tokens for e in batch)
    whole_loss, whole = run(None)
    chunked_loss, chunked = run(49152 * 16)  # 16 positions a chunk
    assert positions > 5 * 16
    assert chunked_loss == pytest.approx(whole_loss, rel=1e-6)
    for name, grad in whole.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-4, atol=1e-6, msg=name)


# A child process measures the peak memory (the rise of its resident set, VmHWM reset before each)
# of one loss and its backward pass: the LM head over n trained positions with a vocabulary of
# 49,152, in one call or in chunks of 64 positions. Allocations above 64 KiB are mmapped, so what is
# freed leaves the resident set and each measurement starts from what is live.
CHILD = """
import json
import torch
from services.trainer import objectives

def resident(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024

def peak(n, chunked):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 49152, bias=False)
    states, targets = torch.randn(n, 64, requires_grad=True), torch.randint(0, 49152, (n,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current one
    before = resident("VmRSS:")
    if chunked:
        loss = -objectives.head_logps(head, states, targets).sum()
    else:
        loss = torch.nn.functional.cross_entropy(head(states), targets, reduction="sum")
    loss.backward()
    return {"peak_mb": resident("VmHWM:") - before, "loss": loss.item()}

objectives.LOGITS_CHUNK = 49152 * 64
peak(256, True)  # first calls set up what later ones reuse (autograd's, checkpoint's)
print(json.dumps({f"{how} {n}": peak(n, how == "chunked") for how in ("chunked", "whole") for n in (512, 1024)}))
"""


def test_the_chunked_head_peak_memory_does_not_grow_with_the_positions():
    """One head call holds the logits (positions x vocabulary: 192 MiB in float32 at 1,024
    positions), their log-softmax and their gradient; the chunks hold one chunk's (12 MiB)."""
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.splitlines()[-1])
    for n in (512, 1024):
        assert peaks[f"chunked {n}"]["loss"] == pytest.approx(peaks[f"whole {n}"]["loss"], rel=1e-5)
    whole, chunked = [peaks[f"whole {n}"]["peak_mb"] for n in (512, 1024)], [peaks[f"chunked {n}"]["peak_mb"]
                                                                            for n in (512, 1024)]
    assert whole[1] > 1.8 * whole[0] > 1.8 * 250     # grows with the positions: ~3 copies of the logits
    assert chunked[1] < chunked[0] + 10 < 80         # does not: a chunk's
    assert chunked[1] < whole[1] / 8


# ------------------------------------------------------------------ packed rows through flash-attn's layout

def _varlen_by_sdpa(q, k, v, cu_q, cu_k, max_q, max_k, *, dropout_p, softmax_scale, causal):
    """flash_attn_varlen_func's contract on CPU: (tokens, heads, dim) with cumulative sequence
    starts; each sequence attends causally to itself (grouped-query heads shared)."""
    assert causal and dropout_p == 0.0 and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
    groups = q.shape[1] // k.shape[1]
    out = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
        qs, ks, vs = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
        out.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=softmax_scale)
                   .squeeze(0).transpose(0, 1))
    return torch.cat(out)


def test_the_flash_varlen_layout_of_packed_rows_gives_the_per_conversation_loop(monkeypatch):
    from services.trainer import packed_attention

    torch.manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1]])  # two rows, padding last
    query, key, value = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    loop, _ = packed_attention.packed_sdpa_attention(None, query, key, value, None, scaling=0.3,
                                                    position_ids=positions)
    varlen = packed_attention._flash_varlen(_varlen_by_sdpa, query, key, value, positions, torch.float32, 0.0, 0.3)
    assert varlen.shape == loop.shape == (2, 10, 4, 8)
    torch.testing.assert_close(varlen, loop)
    # 16-bit queries, or autocast's dtype, qualify for the kernel; float32 outside autocast does not
    assert packed_attention._half_dtype(query) is None
    assert packed_attention._half_dtype(query.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed_attention._half_dtype(query) == torch.bfloat16


# ------------------------------------------------------------------ attention per family

def test_attention_is_sdpa_where_the_model_supports_it_and_eager_for_gemma2s_soft_caps(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from services.trainer.modeling import ModelError

    def tiny(model_type: str, **extra) -> str:
        config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256, **extra)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / model_type)
        return str(tmp_path / model_type)

    llama = tiny("llama")
    gemma2 = tiny("gemma2", head_dim=16, query_pre_attn_scalar=16, attn_logit_softcapping=50.0,
                  final_logit_softcapping=30.0)
    fp32 = Compute("fp32", "cpu", True)
    for path, attention in ((llama, "sdpa"), (gemma2, "eager")):
        recipe = apply_overrides(load_recipe("tiny-sft"), {"base_model": path})
        model = modeling.build_model(recipe, compute=fp32)
        assert model.config._attn_implementation == attention
        model.train()
        out = model(input_ids=torch.randint(0, 256, (2, 12)), use_cache=False)
        out.logits.float().sum().backward()                           # trains, checkpointed, in either
        assert any(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ModelError, match="soft-caps its attention logits"):
        modeling.build_model(apply_overrides(load_recipe("tiny-sft"), {"base_model": gemma2, "training.packing": True}),
                             compute=fp32)
