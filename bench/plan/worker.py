"""One process of bench/plan/run.py.

`build NAME CONFIG_JSON OUT`: a random-weight causal LM of that config (float32, seeded) saved to OUT
with SmolLM2's tokenizer and chat template (`random_model`; bench/gpu builds its models with it too).

`train RECIPE_JSON DATA WORK`: imports everything the trainer uses, takes the resident set size, trains
the recipe with ftpipe's trainer, then prints `MEASURED {json}`: the process's peak resident set
(VmHWM, bench/process_memory.py) minus its resident set after the imports (on a GPU: torch.cuda.max_memory_allocated),
and what the trainer really did: the dtype its linear layers computed in and whether activation
checkpointing was on; and for bench/gpu's timing, when each step ended (`step_ends`, seconds of
time.perf_counter, the device synchronised), the tokens and steps trained and what computed them.
"""
import json
import sys
import time
from pathlib import Path

from bench.process_memory import peak_bytes, resident_bytes


def random_model(config: dict, out: Path, tokenizer, *, dtype: str = "float32", device: str = "cpu",
                 seed: int = 0) -> int:
    """A causal LM of `config` with random weights (seeded), made in float32 on `device` (a GPU
    initialises a billion parameters in a second, a CPU in a minute; float32, so that the draws are
    the same whatever it is saved in) and saved to `out` in `dtype` as safetensors with `tokenizer`;
    returns its parameter count."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build(name: str, config: dict, out: Path) -> None:
    from transformers import AutoTokenizer

    from shared.domain.models import ensure_smollm2

    params = random_model(config, out, AutoTokenizer.from_pretrained(ensure_smollm2()))
    print(json.dumps({"model": name, "params": params}))


def train(recipe_json: str, data: Path, work: Path) -> None:
    # everything the trainer imports, lazily included, before the baseline (bitsandbytes where it
    # is installed: a GPU machine may go without it and skip QLoRA)
    import importlib.util

    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import trl.chat_template_utils  # noqa: F401

    from shared.domain.recipe import Recipe

    from services.trainer import modeling, objectives, training  # noqa: F401

    if importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes  # noqa: F401
    baseline = resident_bytes()
    recipe = Recipe.model_validate_json(recipe_json)
    seen: dict = {}
    build_model = modeling.build_model

    def observed_build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        seen["model"] = model
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        def hook(module, _inputs, output) -> None:   # returns None: the output stays as it is
            # a 4-bit layer computes in its compute_dtype and hands back its input's dtype
            seen.setdefault("compute_dtype", str(getattr(module, "compute_dtype", None) or output.dtype))

        first.register_forward_hook(hook)
        return model

    def on_metrics(rows: list[dict]) -> None:   # metrics_every 1 (recipe_of): called after each step
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seen.setdefault("step_ends", []).extend(time.perf_counter() for _ in rows)
        model = seen["model"]
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        seen.setdefault("checkpointing", bool(getattr(base, "is_activation_checkpointing", False)))

    modeling.build_model = observed_build
    result = training.train(recipe, data, work, on_metrics=on_metrics)
    peak = peak_bytes()
    if torch.cuda.is_available():   # on a GPU: what its allocator handed out at most
        peak, baseline = torch.cuda.max_memory_allocated(), 0
    print("MEASURED " + json.dumps({"peak_bytes": peak - baseline, "baseline_bytes": baseline,
                                    "compute_dtype": seen.get("compute_dtype"),
                                    "checkpointing": seen.get("checkpointing"), "step_ends": seen.get("step_ends"),
                                    "tokens": result.tokens, "steps": result.steps, "compute": result.compute}),
          flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4]))
    else:
        train(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
