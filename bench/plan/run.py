"""The memory planner (shared/domain/memory_plan.py) against measured peaks on this CPU.

    HF_HUB_OFFLINE=1 python bench/plan/run.py [--only NAME] [--adapter KIND] [--mixed] [--steps 3]
                                              [--out bench/plan/results.json | --into RESULTS_JSON]

For random-weight models of several architectures (shapes of public models, the smallest cut down
to stay within 0.1-1B parameters; SmolLM2's tokenizer), each configuration trains a few steps of
ftpipe's real trainer in a fresh process (bench/plan/worker.py) on generated chats whose assistant
turns run past max_seq_len (every row max_seq_len tokens, nearly all trained: the planner's worst
case). Measured: the process's peak resident set minus its resident set after the imports.
Predicted: `memory_plan.estimate` for the CPU at the configuration's micro-batch, with the logits
chunk of the trainer that runs (every trained position at once before the chunked cross-entropy).

The configurations of the `tuning` role set the planner's CPU constants (CPU_HEAP_RETENTION,
CPU_RUNTIME_BYTES); the `validation` ones were not looked at while choosing them. A configuration
asking for bf16 or activation checkpointing is measured only if the trainer honours it (the worker
reports the dtype its linear layers computed in and whether checkpointing was on); otherwise its row
says so and carries the prediction alone.

`--gpu KIND` (on a machine with that GPU): the same configurations on the GPU, the planner's
`allocated` (the tensors alive at the peak) against torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shared.domain.memory_plan import MIB, ModelShape, cpu_device, estimate, gpu_device  # noqa: E402
from shared.domain.recipe import Recipe  # noqa: E402

from services.trainer import objectives  # noqa: E402

# The trainer's chunk of logits (objectives.LOGITS_CHUNK, issue 20); a trainer without it computes
# every trained position's logits at once, and is predicted as such.
TRAINER_LOGITS_CHUNK = getattr(objectives, "LOGITS_CHUNK", None)

WORKER = Path(__file__).with_name("worker.py")
TOLERANCE = 0.20

# Shapes of public models (their config.json figures); the vocabulary is the model's own, which
# SmolLM2's token ids (< 49,152) all fit.
MODELS: dict[str, dict] = {
    # tuning: SmolLM2-360M (Llama)
    "llama-360m": {"role": "tuning", "shape_of": "SmolLM2-360M", "config": {
        "model_type": "llama", "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
        "num_attention_heads": 15, "num_key_value_heads": 5, "vocab_size": 49152, "tie_word_embeddings": True}},
    # validation
    "qwen2-0.5b": {"role": "validation", "shape_of": "Qwen2.5-0.5B", "config": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True}},
    "pythia-410m": {"role": "validation", "shape_of": "Pythia-410M (GPT-NeoX)", "config": {
        "model_type": "gpt_neox", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "vocab_size": 50304, "rotary_pct": 0.25, "use_parallel_residual": True,
        "tie_word_embeddings": False}},
    "gemma2-0.45b": {"role": "validation", "shape_of": "Gemma-2 (12 layers of width 1024)", "config": {
        "model_type": "gemma2", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 12,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 256000,
        "query_pre_attn_scalar": 128, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True}},
    "llama-1b": {"role": "validation", "shape_of": "Llama-3.2-1B, 12 of its 16 layers", "config": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 12,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "tie_word_embeddings": True}},
}


def _row(model: str, kind: str, precision: str = "fp32", checkpointing: bool = False, seq: int = 256,
         batch: int = 2, accum: int = 1) -> dict:
    return {"model": model, "kind": kind, "precision": precision, "checkpointing": checkpointing, "seq": seq,
            "batch": batch, "accum": accum}


def configurations() -> list[dict]:
    rows = [_row("llama-360m", k, seq=s) for k in ("lora", "full", "qlora") for s in (128, 512)]
    rows += [_row("llama-360m", "lora", batch=4), _row("llama-360m", "full", batch=1, accum=2)]
    # several micro-batches a step (CPU_HEAP_RETENTION_ACCUMULATING was fitted on these)
    rows += [_row("llama-360m", "lora", batch=1, accum=a) for a in (2, 4)]
    rows += [_row("llama-360m", "lora", seq=128, accum=2), _row("llama-360m", "lora", seq=512, batch=1, accum=2),
             _row("llama-360m", "qlora", batch=1, accum=2)]
    for model, small in (("qwen2-0.5b", True), ("pythia-410m", True), ("gemma2-0.45b", True), ("llama-1b", False)):
        kinds = ("lora", "qlora", "full") if small else ("lora", "qlora")
        rows += [_row(model, k) for k in kinds]
        rows.append(_row(model, "lora", seq=512, batch=1, accum=2))
    # bf16 and activation checkpointing, measured once the trainer honours training.precision and
    # training.gradient_checkpointing (issue 20)
    for model in ("llama-360m", "qwen2-0.5b", "pythia-410m", "gemma2-0.45b", "llama-1b"):
        rows += [_row(model, "lora", precision="bf16"), _row(model, "lora", checkpointing=True),
                 _row(model, "lora", precision="bf16", checkpointing=True),
                 _row(model, "qlora", precision="bf16", checkpointing=True)]
        if model != "llama-1b":
            rows += [_row(model, "full", precision="bf16"), _row(model, "full", precision="bf16", checkpointing=True)]
    return rows


def recipe_of(row: dict, folder: Path, steps: int) -> Recipe:
    return Recipe.model_validate({
        "name": "plan-bench", "version": 1, "base_model": str(folder), "model_name": "plan-bench",
        "adapter": {"kind": row["kind"], "r": 16, "alpha": 32},
        "training": {"max_steps": steps, "batch_size": row["batch"], "grad_accum": row["accum"],
                     "max_seq_len": row["seq"], "precision": row["precision"],
                     "gradient_checkpointing": row["checkpointing"], "checkpoint_every": 10_000,
                     "metrics_every": 1, "group_by_length": False, "learning_rate": 1e-4}})


def write_chats(data: Path, rows: int = 16, seed: int = 0) -> None:
    """Chats whose answers run past any max_seq_len here: every row is cut at max_seq_len, all but
    the prompt's few tokens trained."""
    words = ("the order shipped late because the courier lost the parcel and we will refund it today please "
             "check your email for the tracking number of the replacement").split()
    rng = random.Random(seed)
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "train.jsonl", "w") as fh:
        for i in range(rows):
            answer = " ".join(rng.choice(words) for _ in range(1500))
            fh.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": "Where is my order?"},
                                                             {"role": "assistant", "content": answer}]}) + "\n")


def _python(*args: str, script: Path = WORKER, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def ensure_model(name: str, work: Path) -> Path:
    folder = work / "models" / name
    if not (folder / "config.json").is_file():
        proc = _python("build", name, json.dumps(MODELS[name]["config"]), str(folder))
        if proc.returncode != 0:
            raise RuntimeError(f"building {name} failed: {proc.stderr[-2000:]}")
    return folder


def measure(recipe: Recipe, data: Path, work: Path, *, script: Path = WORKER, command: str = "train",
            timeout: float | None = None) -> dict:
    """The recipe trained in a fresh process (`script command RECIPE_JSON DATA WORK`: worker.py's
    ftpipe trainer, or another trainer that prints MEASURED as it does): its MEASURED figures, or
    {"error": the last line of its stderr, "stderr": the end of it}."""
    shutil.rmtree(work, ignore_errors=True)   # no checkpoint of another configuration
    try:
        proc = _python(command, recipe.model_dump_json(), str(data), str(work), script=script, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("MEASURED ")), None)
    if proc.returncode != 0 or line is None:
        stderr = proc.stderr.strip()
        return {"error": stderr.splitlines()[-1][:300] if stderr else f"exit {proc.returncode}", "stderr": stderr[-4000:]}
    return json.loads(line[len("MEASURED "):])


def honoured(row: dict, measured: dict) -> str | None:
    """Why a measurement does not test the row (the trainer ran something else), or None."""
    wanted = "torch.bfloat16" if row["precision"] == "bf16" else "torch.float32"
    if measured.get("compute_dtype") != wanted:
        return f"the trainer computed in {measured.get('compute_dtype')}, not {row['precision']}"
    if bool(measured.get("checkpointing")) != row["checkpointing"]:
        return f"the trainer ran with checkpointing {'on' if measured.get('checkpointing') else 'off'}"
    return None


def report(results: dict) -> str:
    """The results as bench/README.md shows them (Markdown)."""
    lines = ["| role | model | adapter | precision | checkpointing | seq x batch x accum | predicted | measured | error |",
             "|---|---|---|---|---|---|---:|---:|---:|"]
    for r in results["rows"]:
        measured = f"{r['measured_bytes'] / MIB:,.0f} MiB" if "measured_bytes" in r else "-"
        error = f"{r['error']:+.1%}" if "error" in r else f"not measured: {r['not_measured']}"
        lines.append(f"| {r['role']} | {r['model']} | {r['kind']} | {r['precision']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['seq']} x {r['batch']} x {r['accum']} | "
                     f"{r['predicted_bytes'] / MIB:,.0f} MiB | {measured} | {error} |")
    return "\n".join(lines)


def _key(row: dict) -> tuple:
    return tuple(row[k] for k in ("model", "kind", "precision", "checkpointing", "seq", "batch", "accum"))


def merged(earlier: list[dict], now: list[dict]) -> list[dict]:
    """earlier's rows, those measured again now replaced, in earlier's order."""
    fresh = {_key(r): r for r in now}
    return [fresh.get(_key(r), r) for r in earlier] + [r for r in now if _key(r) not in {_key(e) for e in earlier}]


def summarise(rows: list[dict]) -> dict:
    summary = {}
    for role in ("tuning", "validation"):
        errors = [r["error"] for r in rows if r["role"] == role and "error" in r]
        if errors:
            summary[role] = {"measured": len(errors), "max_abs_error": round(max(abs(e) for e in errors), 4),
                             "mean_abs_error": round(sum(abs(e) for e in errors) / len(errors), 4),
                             "within_tolerance": sum(abs(e) <= TOLERANCE for e in errors)}
    summary["not_measured"] = sum("not_measured" in r for r in rows)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/ftpipe-bench-plan"))
    ap.add_argument("--out", type=Path, help="default: bench/plan/results.json (results-GPU.json with --gpu)")
    ap.add_argument("--only", help="only the configurations of this model")
    ap.add_argument("--mixed", action="store_true", help="only the configurations asking for bf16 or checkpointing")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (AdamW's state exists from the first)")
    ap.add_argument("--gpu", choices=["l4", "a100", "a100-80gb", "h100"],
                    help="on a machine with this GPU: predicted tensors (allocated_bytes) against "
                         "torch.cuda.max_memory_allocated, in one process per configuration as on CPU")
    ap.add_argument("--skip-unsupported", action="store_true",
                    help="after a configuration the trainer did not honour, skip those asking the same")
    ap.add_argument("--adapter", choices=["lora", "qlora", "full"], help="only the configurations of this adapter")
    ap.add_argument("--into", type=Path, metavar="RESULTS_JSON",
                    help="the configurations measured now replace the same ones in this results file (its summary redone)")
    ap.add_argument("--report", type=Path, metavar="RESULTS_JSON", help="print a results file as Markdown; run nothing")
    args = ap.parse_args()
    if args.report:
        print(report(json.loads(args.report.read_text())))
        return 0
    data = args.work / "data"
    write_chats(data)
    device = gpu_device(args.gpu) if args.gpu else cpu_device()
    rows, unsupported = [], set()
    print(f"{'model':<13} {'adapter':<6} {'prec':<5} {'ckpt':<4} {'seq x batch x accum':<20} {'predicted':>10} "
          f"{'measured':>10} {'error':>7}  role / note", flush=True)
    for row in configurations():
        if ((args.only and row["model"] != args.only) or (args.adapter and row["kind"] != args.adapter)
                or (args.mixed and row["precision"] == "fp32" and not row["checkpointing"])):
            continue
        model = MODELS[row["model"]]
        folder = ensure_model(row["model"], args.work)
        recipe = recipe_of(row, folder, args.steps)
        config = json.loads((folder / "config.json").read_text())
        predicted = estimate(config, recipe, device, row["batch"], logits_chunk=TRAINER_LOGITS_CHUNK)
        out = {**row, "role": model["role"], "shape_of": model["shape_of"], "device": device.kind,
               "params": ModelShape.from_config(config).params,
               "predicted_bytes": predicted.allocated if device.gpu else predicted.peak,
               "predicted_phase": predicted.phase, "predicted_at_peak": predicted.at_peak}
        feature = (row["precision"], row["checkpointing"])
        if args.skip_unsupported and feature in unsupported:
            out["not_measured"] = "the trainer does not honour this yet (see an earlier row)"
        else:
            measured = measure(recipe, data, args.work / "run")
            if "error" in measured:
                out["not_measured"] = f"failed: {measured['error']}"
            elif reason := honoured(row, measured):
                out["not_measured"] = reason
                unsupported.add(feature)
            else:
                out["measured_bytes"] = measured["peak_bytes"]
                out["error"] = round(out["predicted_bytes"] / measured["peak_bytes"] - 1, 4)
        rows.append(out)
        shape = f"{row['seq']} x {row['batch']} x {row['accum']}"
        measured_text = f"{out['measured_bytes'] / MIB:>8.0f} M" if "measured_bytes" in out else f"{'-':>10}"
        error_text = f"{out['error']:>+7.1%}" if "error" in out else f"{'':>7}"
        print(f"{row['model']:<13} {row['kind']:<6} {row['precision']:<5} {'on' if row['checkpointing'] else 'off':<4} "
              f"{shape:<20} {out['predicted_bytes'] / MIB:>8.0f} M {measured_text} {error_text}  {model['role']}"
              + (f" ({out['not_measured']})" if "not_measured" in out else ""), flush=True)
    if args.into:
        rows = merged(json.loads(args.into.read_text())["rows"], rows)
    summary = summarise(rows)
    how = "torch.cuda.max_memory_allocated" if args.gpu else "peak resident set (VmHWM) minus resident set after imports"
    result = {"date": date.today().isoformat(), "cores": os.cpu_count(), "python": platform.python_version(),
              "device": device.kind, "trainer_logits_chunk": TRAINER_LOGITS_CHUNK, "tolerance": TOLERANCE,
              "measure": how,
              "summary": summary, "models": MODELS, "rows": rows}
    if not (args.only or args.mixed or args.adapter) or args.out or args.into:
        out = args.into or args.out or Path(__file__).with_name(f"results-{args.gpu}.json" if args.gpu else "results.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
