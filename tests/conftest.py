import os

import pytest

# Tests never reach a model hub; everything they load is local or generated.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["tests.emulators", "tests.strict_ci", "tests.browser.fixtures"]


@pytest.fixture(scope="session")
def spark():
    """One local SparkSession for every test that needs Spark (a process holds one anyway); the
    quick JVM (C1 only) starts sooner and the tests' jobs are small."""
    pytest.importorskip("pyspark")
    from services.preprocess.spark import build_session

    return build_session(cores=2, shuffle_partitions=2, quick_jvm=True)


@pytest.fixture(scope="session")
def tokenizer():
    """The tiny random model's tokenizer (SmolLM2's vocabulary and chat template)."""
    from transformers import AutoTokenizer

    from shared.domain.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("tiny-random-smollm2"))
