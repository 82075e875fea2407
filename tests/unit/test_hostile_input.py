"""Hostile input refused with its reason before it can hurt a service (the chaos suite,
chaos/test_hostile.py, drops each through the whole stack)."""
import io
import logging
import threading

import pytest

from shared.domain import events as ev
from shared.domain.jobs import JobError, submit
from shared.domain.recipe import RecipeError, parse_recipe
from shared.platform.config import Settings, bootstrap
from shared.platform.runtime import Context
from tests.unit.governance import ADMIN

from services.preprocess import formats
from services.preprocess.job import _capped_lines
from services.preprocess.service import on_upload


class Chunks(io.RawIOBase):
    """A stream of `n` MiB of 'x' then a newline and a short line, never held whole."""

    def __init__(self, mib: int):
        self.left, self.tail = mib, b'\n{"ok": 1}\n'

    def read(self, size=-1):
        if self.left:
            self.left -= 1
            return b"x" * 2 ** 20
        out, self.tail = self.tail, b""
        return out


def test_a_line_over_the_limit_is_replaced_by_a_marker_without_being_held():
    out = io.BytesIO()
    assert _capped_lines(Chunks(64), 1000, out) is True
    marker, rest = out.getvalue().split(b"\n", 1)
    assert marker == formats.long_line_marker(64 * 2 ** 20) and rest == b'{"ok": 1}\n'
    record = next(formats.validate_jsonl([(marker.decode(), 0)], formats.RowRules(max_row_bytes=1000)))
    assert record[0] == "bad" and record[3] == "too_large" and "67108864 bytes" in record[4]
    assert _capped_lines(io.BytesIO(b'{"a": 1}\n{"b": 2}'), 1000) is False


@pytest.mark.parametrize("cell", ['=HYPERLINK("http://evil.example","x")', "@SUM(A1:A9)", "+cmd|' /C calc'!A0",
                                  " =1+1", "-SUM(A1)"])
def test_csv_cells_that_spreadsheets_would_run_are_refused(cell):
    with pytest.raises(formats.RowError, match="spreadsheet formula") as err:
        formats.check_formulas({"response": cell})
    assert err.value.code == "formula"


@pytest.mark.parametrize("cell", ["- item one", "+1 555 0100", "-2 degrees", "a = b"])
def test_ordinary_text_that_starts_with_a_sign_is_kept(cell):
    formats.check_formulas({"response": cell})


def test_text_that_was_not_utf8_is_refused_even_when_it_parses():
    line = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'.decode("utf-8", "replace")
    with pytest.raises(formats.RowError, match="not valid UTF-8") as err:
        formats.parse_json_line(line)
    assert err.value.code == "bad_encoding"


def test_a_recipe_with_a_python_tag_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        parse_recipe(f"name: x\ndata: !!python/object/apply:os.system ['touch {marker}']\n")
    assert not marker.exists()


@pytest.fixture
def ctx(tmp_path):
    adapters = bootstrap(Settings(state_dir=tmp_path / "state"))
    return Context("preprocess", adapters, message=None, stopping=threading.Event(),
                   log=logging.LoggerAdapter(logging.getLogger("test"), {}))


@pytest.mark.parametrize("name, says", [
    ("incoming/support-assistant/../../../etc/passwd", "'..' path segment"),
    ("incoming/../x.jsonl", "'..' path segment"),
    ("incoming/recipe.yaml/data.jsonl", "'recipe.yaml' is not a recipe name"),
])
def test_unsafe_drop_names_are_refused_with_the_reason(ctx, name, says):
    (out,) = on_upload(ev.ObjectFinalized(bucket="ftpipe", name=name, generation="1"), ctx)
    assert isinstance(out, ev.DatasetRejected) and says in out.reason and out.reason.startswith("drop refused")


@pytest.mark.parametrize("url", ["file:///etc/passwd", "{root}/ftpipe/../../../../etc/passwd"])
def test_a_job_with_a_dataset_url_outside_the_store_is_refused(ctx, url):
    store = ctx.adapters.store
    with pytest.raises(JobError, match="is not an object of this store"):
        submit(ctx.adapters.docs, store, ctx.adapters.bus, "ftpipe", ADMIN, {"recipe": "tiny-sft",
                                                   "dataset": url.format(root=store.root.as_uri())})
