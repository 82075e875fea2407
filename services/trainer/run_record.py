"""The run record: what a training run needs to be reproduced, written beside its adapter.

`run_record.json` names the recipe (name, version, hash), the base model (its reference and a
content hash of its files: a reference such as a hub id or a cache folder can come to mean other
weights later), the dataset (its manifest's sha256 and id, the train split's sha256), the seed, the
code (git commit, and whether the tree had local changes), the machine (device, torch threads,
Python), the memory plan beside the peak the run reached, and every installed package with its
version (a lockfile of the environment the run used).
The registry copies it into the model bundle.
Rerunning the same record on CPU gives the same loss curve (tests/unit/test_training.py).
"""
from __future__ import annotations

import json
import platform
import resource
from pathlib import Path

import torch

from shared.domain.memory_plan import PlanError, cpu_device, plan_recipe
from shared.domain.models import base_model_identity
from shared.domain.recipe import Recipe
from shared.platform.build_info import ftpipe_version, git_commit, installed_packages
from shared.platform.storage import file_sha256


def dataset_identity(data_dir: Path) -> dict:
    """The prepared dataset the run trained on: its manifest (as preprocess wrote it) and train split."""
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    identity = {"manifest_sha256": None, "dataset_id": None,
                "train_sha256": file_sha256(data_dir / "train.jsonl")}
    if manifest.is_file():
        identity["manifest_sha256"] = file_sha256(manifest)
        try:
            identity["dataset_id"] = json.loads(manifest.read_text()).get("dataset_id")
        except (ValueError, AttributeError):
            pass  # the hash still identifies it; preprocess writes a JSON object
    return identity


def build(recipe: Recipe, data_dir: Path, *, device: str, result: dict) -> dict:
    """The record of one finished run (`result`: steps, tokens, seconds, metrics)."""
    return {
        "recipe": {"name": recipe.name, "version": recipe.version, "hash": recipe.hash,
                   "base_model": recipe.base_model, "method": recipe.method, "adapter": recipe.adapter.kind},
        "base_model": base_model_identity(recipe.base_model),
        "dataset": dataset_identity(data_dir),
        "seed": recipe.training.seed,
        "code": {"ftpipe": ftpipe_version(), **git_commit()},
        "machine": {"device": device, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "result": result,
        "memory": memory(recipe, device),
        "packages": installed_packages(),
    }


def memory(recipe: Recipe, device: str) -> dict:
    """The memory plan of the run on its device (a GPU of the recipe's hardware, or this CPU) beside
    the peak it reached: torch.cuda.max_memory_allocated on a GPU (compare the plan's
    allocated_bytes), the process's peak resident set on a CPU (imports included)."""
    try:
        plan = plan_recipe(recipe, None if device.startswith("cuda") else cpu_device()).to_dict()
    except PlanError as exc:
        plan = {"error": str(exc)}
    if device.startswith("cuda"):
        measured, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        measured, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident set (ru_maxrss)"
    return {"plan": plan, "measured_peak_bytes": measured, "measured": how}


def write(path: Path, record: dict) -> Path:
    path = Path(path)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path
