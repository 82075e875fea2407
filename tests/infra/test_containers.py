"""The images (infra/docker), the registry functions' source (infra/functions/registry), the
Cloud Build config and the Kubernetes objects (infra/k8s), checked without a Docker engine:
hadolint, the house rules (pinned bases, a non-root user, a health check or Cloud Run's probes, only
the code a service needs), every entrypoint module exists, and each slim image's requirements
cover what its code can import."""
from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from shared.domain.recipe import PRIORITIES, SchedulingSpec, load_recipe

from services.trainer import k8s

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "infra" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*/Dockerfile"))
SERVICES = [p.parent.name for p in DOCKERFILES]
# Cloud Run probes these services' /healthz (infra/terraform/cloudrun.tf) instead of a HEALTHCHECK.
CLOUD_RUN = {"evaluator", "tracker"}
# What each slim image or source bundle runs: its requirements must cover every import reachable from it.
SLIM = {
    "tracker": (DOCKER / "tracker" / "requirements.txt", ["services.tracker.main"]),
    "preprocess": (DOCKER / "preprocess" / "requirements.txt", ["services.preprocess.main", "services.preprocess.job"]),
    "registry": (ROOT / "infra" / "functions" / "registry" / "requirements.txt", ["services.registry_fn.main"]),
}
# Distribution name -> the module it provides, where they differ.
MODULE_OF = {"pyyaml": "yaml", "google-auth": "google", "google-cloud-pubsub": "google",
             "google-cloud-storage": "google", "google-cloud-firestore": "google", "google-cloud-dataproc": "google",
             "functions-framework": "functions_framework"}
# Modules the code imports that come with a listed package (its own dependencies).
BRINGS = {"flask": {"werkzeug"}, "functions_framework": {"flask", "werkzeug"}, "google": {"grpc"},
          "transformers": {"huggingface_hub"}}
# Imported only by an optional feature the image leaves out, with the reason.
OPTIONAL = {"preprocess": {"presidio_analyzer": "data.pii_backend presidio: the pii-presidio extra",
                           "spacy": "data.pii_backend presidio: the pii-presidio extra"}}
# Provided by the platform rather than the image: Dataproc mounts Spark into the container.
PLATFORM = {"preprocess": {"pyspark"}}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", "\n".join(l for l in path.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def test_there_is_an_image_per_service():
    assert set(SERVICES) == {"preprocess", "trainer", "evaluator", "tracker"}


def test_hadolint():
    hadolint = ROOT / ".venv-infra" / "bin" / "hadolint"
    if not hadolint.exists():
        pytest.skip(f"{hadolint} is missing: `make setup` installs the infra tools into .venv-infra")
    result = subprocess.run([str(hadolint), "--failure-threshold", "info", *map(str, DOCKERFILES)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile_rules(service):
    path = DOCKER / service / "Dockerfile"
    steps = instructions(path)
    args_without_default = {a.split("=")[0] for kind, a in steps if kind == "ARG" and "=" not in a}
    for kind, arg in steps:
        if kind == "FROM":
            image = arg.split()[0]
            if image.startswith("${"):
                # the trainer image of the same build, tagged with it (cloudbuild.yaml)
                assert image.strip("${}") in args_without_default, f"{service}: {image} must be a build argument"
                continue
            assert ":" in image and not image.endswith(":latest"), f"{service}: FROM {image} is not pinned"
            tag = image.rsplit(":", 1)[1]
            assert "@sha256:" in image or re.search(r"\d+\.\d+", tag), f"{service}: FROM {image}: pin an exact version"
        if kind in ("COPY", "ADD"):
            assert kind == "COPY", f"{service}: use COPY, not ADD"
            parts = [p for p in arg.split() if not p.startswith("--")]
            if any(a.startswith("--from") for a in arg.split()):
                continue
            for source in parts[:-1]:
                assert source not in (".", "./", "*"), f"{service}: copy only what the service needs, not {source!r}"
                assert (ROOT / source).exists(), f"{service}: COPY {source} does not exist"
    users = [a for kind, a in steps if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{service}: the image must end as a non-root USER"
    assert users[-1].split(":")[0].isdigit(), f"{service}: a numeric USER, so Kubernetes can check runAsNonRoot"
    if service not in CLOUD_RUN:
        assert any(kind == "HEALTHCHECK" for kind, _ in steps), f"{service}: no HEALTHCHECK"
    else:
        cloudrun = (ROOT / "infra" / "terraform" / "cloudrun.tf").read_text()
        block = cloudrun.split(f'resource "google_cloud_run_v2_service" "{service}"')[1].split("\nresource ")[0]
        assert "startup_probe" in block and 'path = "/healthz"' in block


def _entry_modules(command: list[str]) -> list[str]:
    modules = [command[i + 1] for i, part in enumerate(command[:-1]) if part == "-m"]
    modules += [m.split(":")[0].strip("'") for m in re.findall(r"'([\w.]+:\w+\(\))'", " ".join(command))]
    return modules


@pytest.mark.parametrize("service", SERVICES)
def test_the_entrypoint_module_exists(service):
    [cmd] = [a for kind, a in instructions(DOCKER / service / "Dockerfile") if kind == "CMD"]
    modules = _entry_modules(yaml.safe_load(cmd))
    assert modules, f"{service}: CMD runs no module: {cmd}"
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"{service}: CMD runs {module}, which does not exist"
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()


def _requirements(path: Path) -> dict[str, str]:
    lines = [l.split("#")[0].strip() for l in path.read_text().splitlines()]
    return {re.split(r"[<>=!~ ]", l, maxsplit=1)[0].lower(): l for l in lines if l}


def _pyproject_dependencies() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower(): d.replace(" ", "") for d in deps}


@pytest.mark.parametrize("bundle", sorted(SLIM))
def test_slim_requirements_are_pyprojects(bundle):
    requirements, _ = SLIM[bundle]
    pinned = _pyproject_dependencies()
    for name, line in _requirements(requirements).items():
        assert name in pinned, f"{requirements.name} of {bundle}: {name} is not an ftpipe dependency"
        assert line.replace(" ", "") == pinned[name], f"{bundle}: {line!r} differs from pyproject.toml's {pinned[name]!r}"


def _reachable_imports(entry_modules: list[str]) -> set[str]:
    """Top-level third-party modules imported anywhere (functions included) in the project modules
    reachable from the entry modules."""
    seen, third_party, todo = set(), set(), list(entry_modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.is_file():
            path = ROOT / module.replace(".", "/") / "__init__.py"
            if not path.is_file():  # a namespace package (shared/ has no __init__.py)
                continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top in ("shared", "services", "ftpipe"):
                    parts = name.split(".")
                    todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
                    if isinstance(node, ast.ImportFrom):  # `from shared import events`: a submodule
                        todo += [f"{name}.{a.name}" for a in node.names
                                 if (ROOT / name.replace(".", "/") / f"{a.name}.py").is_file()]
                elif top not in sys.stdlib_module_names:
                    third_party.add(top)
    return third_party


@pytest.mark.parametrize("bundle", sorted(SLIM))
def test_slim_requirements_cover_what_the_code_imports(bundle):
    requirements, entries = SLIM[bundle]
    provided = {MODULE_OF.get(name, name.replace("-", "_")) for name in _requirements(requirements)}
    provided |= PLATFORM.get(bundle, set())
    provided |= {module for dist in list(provided) for module in BRINGS.get(dist, ())}
    missing = _reachable_imports(entries) - provided - set(OPTIONAL.get(bundle, {}))
    assert not missing, f"{bundle}: code reachable from {entries} imports {sorted(missing)}, not in {requirements.relative_to(ROOT)}"


def test_the_registry_source_exports_both_entry_points():
    source = (ROOT / "infra" / "functions" / "registry" / "main.py").read_text()
    assert "from services.registry_fn.main import approve, on_evaluation" in source


# ------------------------------------------------------------------ Cloud Build

def test_cloudbuild_builds_every_image_and_the_files_terraform_deploys():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    built = {}
    for step in build["steps"]:
        args = step.get("args", [])
        if args[:1] == ["build"]:
            dockerfile = args[args.index("-f") + 1]
            built[Path(dockerfile).parent.name] = args[args.index("-t") + 1]
        assert ":" in step["name"] and not step["name"].endswith(":latest"), f"builder {step['name']} is not pinned"
    assert set(built) == set(SERVICES)
    assert set(build["images"]) == set(built.values())
    assert all(tag == f"$_REPOSITORY/{service}:$_TAG" for service, tag in built.items())
    script = " ".join(" ".join(s.get("args", [])) for s in build["steps"])
    terraform = "\n".join(p.read_text() for p in (ROOT / "infra" / "terraform").glob("*.tf"))
    for name in ("ftpipe-py3-none-any.whl", "preprocess_job.py", "registry-fn.zip"):
        assert name in script and name in terraform, name
    assert "gs://$_BUCKET/dist/$_TAG/" in script and 'dist = "dist/${var.image_tag}"' in terraform
    # the function source carries what the registry imports
    for part in ("infra/functions/registry/main.py", "infra/functions/registry/requirements.txt", "shared",
                 "services/__init__.py", "services/registry_fn"):
        assert part in script


# ------------------------------------------------------------------ Kubernetes

def _k8s(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "infra" / "k8s" / name).read_text()))


def test_the_cluster_has_the_objects_the_rendered_jobs_name():
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _k8s("cluster.yaml")}
    job = k8s.render(load_recipe("tiny-sft"), "run-1", "gs://b/d/", image="i")
    namespace = job["metadata"]["namespace"]
    assert ("Namespace", namespace) in objects
    pod = job["spec"]["template"]["spec"]
    assert objects[("ServiceAccount", pod["serviceAccountName"])]["metadata"]["namespace"] == namespace
    values = []
    for priority in PRIORITIES:  # lowest first
        recipe = load_recipe("tiny-sft").model_copy(update={"scheduling": SchedulingSpec(priority=priority)})
        values.append(objects[("PriorityClass", k8s.priority_class(recipe))]["value"])
        assert ("WorkloadPriorityClass", k8s.priority_class(recipe)) in objects
    assert values == sorted(values) and len(set(values)) == len(values)
    queue = job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    assert queue == SchedulingSpec().queue
    assert objects[("LocalQueue", queue)]["metadata"]["namespace"] == namespace
    iam = (ROOT / "infra" / "terraform" / "iam.tf").read_text()
    for (kind, name), obj in objects.items():
        if kind == "ServiceAccount":
            assert f'"{name}"' in iam, f"no Workload Identity binding for {name} in iam.tf"
            assert obj["metadata"]["annotations"]["iam.gke.io/gcp-service-account"].startswith(f"{name}-${{ENV}}@")


def test_the_workers_run_entrypoints_that_exist_with_the_jobs_placement():
    workers = {o["metadata"]["name"]: o for o in _k8s("workers.yaml")}
    job = k8s.render(load_recipe("support-assistant"), "run-1", "gs://b/d/", image="i")
    job_pod = job["spec"]["template"]["spec"]
    for name, deployment in workers.items():
        pod = deployment["spec"]["template"]["spec"]
        [container] = pod["containers"]
        for module in _entry_modules(container["command"]):
            assert importlib.util.find_spec(module) is not None, f"{name} runs {module}, which does not exist"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["FTPIPE_PROFILE"] == "gcp" and env["PORT"] == "8080"
        assert pod["securityContext"]["runAsNonRoot"] is True
    trainer = workers["ftpipe-trainer"]["spec"]["template"]["spec"]
    assert trainer["nodeSelector"] == job_pod["nodeSelector"]  # the same pool as a run's Job
    assert trainer["tolerations"] == job_pod["tolerations"]
    assert trainer["serviceAccountName"] == job_pod["serviceAccountName"]
    assert trainer["terminationGracePeriodSeconds"] == k8s.GRACE_PERIOD_S
    # the Job's own entrypoint exists too
    assert importlib.util.find_spec(job_pod["containers"][0]["command"][2]) is not None
