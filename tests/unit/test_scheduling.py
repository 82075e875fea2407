"""The priority policy (shared/platform/scheduling.py) and the subscription filter it relies on."""
import itertools

import pytest

from shared.domain import events as ev
from shared.domain.recipe import Recipe
from shared.platform.ports import AttributeFilter
from shared.platform.scheduling import CLASSES, PriorityPicker, class_filter, class_subscription


def drain(picker, queues: dict[str, list], tried: list | None = None) -> list[str]:
    """Take from `queues` until all are empty; the order in which messages were taken."""
    def pull(c):
        if tried is not None:
            tried.append(c)
        return queues[c].pop(0) if queues[c] else None

    taken = []
    while (got := picker.take(pull)) is not None:
        taken.append(got[1])
    return taken


def test_highest_class_first_when_no_class_waits_long():
    queues = {"production": ["p1"], "interactive": ["i1"], "batch": ["b1"]}
    assert drain(PriorityPicker(CLASSES, starvation_limit=3), queues) == ["p1", "i1", "b1"]


def test_a_steady_stream_of_production_does_not_starve_batch():
    queues = {"production": [f"p{i}" for i in range(10)], "interactive": [], "batch": ["b1", "b2"]}
    taken = drain(PriorityPicker(CLASSES, starvation_limit=3), queues)
    # Batch gets the first try after 3 picks passed it over, each time.
    assert taken[:8] == ["p0", "p1", "p2", "b1", "p3", "p4", "p5", "b2"]


def test_when_several_classes_are_due_the_most_passed_over_goes_first():
    # With a limit of 1 and every class full, taking the due class with the higher priority first
    # would starve batch (interactive and production would take turns); the most passed over goes first.
    queues = {c: [f"{c[0]}{i}" for i in range(4)] for c in CLASSES}
    taken = drain(PriorityPicker(CLASSES, starvation_limit=1), queues)
    assert taken[:6] == ["p0", "i0", "b0", "p1", "i1", "b1"]


def test_every_class_is_taken_within_a_bounded_number_of_picks():
    queues = {c: [c] * 50 for c in CLASSES}
    taken = drain(PriorityPicker(CLASSES, starvation_limit=2), queues)
    for c in CLASSES:
        turns = [k for k, t in enumerate(taken[:100]) if t == c]
        assert max(b - a for a, b in itertools.pairwise([-1] + turns)) <= 2 + len(CLASSES), (c, turns)
    assert taken[:3] == ["production", "production", "interactive"]


def test_a_class_found_empty_is_not_owed_a_turn():
    tried = []
    queues = {"production": [f"p{i}" for i in range(5)], "interactive": [], "batch": []}
    picker = PriorityPicker(CLASSES, starvation_limit=2)
    assert drain(picker, queues, tried)[:5] == ["p0", "p1", "p2", "p3", "p4"]
    # After two picks passed them over, the lower classes are tried first (empty), then production.
    p, i, b = CLASSES
    assert tried == [p, p, i, b, p, p, p, i, b, p]  # the last round finds all three empty
    assert picker.passed_over == {"production": 0, "interactive": 0, "batch": 0}


def test_nothing_waiting_takes_nothing():
    picker = PriorityPicker(CLASSES)
    assert picker.take(lambda c: None) is None
    with pytest.raises(ValueError, match="at least 1"):
        PriorityPicker(CLASSES, starvation_limit=0)


def test_class_subscriptions_and_filters():
    assert [class_subscription("trainer", "jobs", c) for c in CLASSES] == [
        "trainer.jobs.production", "trainer.jobs.interactive", "trainer.jobs"]
    assert class_filter("production").matches({"priority": "production"})
    assert not class_filter("production").matches({"priority": "batch"})
    assert not class_filter("production").matches({})
    assert class_filter("batch").matches({}) and class_filter("batch").matches({"priority": "batch"})
    assert class_filter("batch").expression() == 'attributes.priority = "batch" OR NOT attributes:priority'


@pytest.mark.parametrize("f", [AttributeFilter("priority", ("production",)),
                               AttributeFilter("priority", ("batch",), or_missing=True),
                               AttributeFilter("k", ("a", "b"))])
def test_filter_expression_round_trips(f):
    assert AttributeFilter.parse(f.expression()) == f


def test_filters_outside_the_subset_are_not_parsed_or_built():
    assert AttributeFilter.parse('hasPrefix(attributes.k, "a")') is None
    assert AttributeFilter.parse('attributes.a = "x" OR attributes.b = "y"') is None
    with pytest.raises(ValueError, match="quotes"):
        AttributeFilter("k", ('a"b',))
    with pytest.raises(ValueError, match="matches nothing"):
        AttributeFilter("k", ())


def test_events_with_a_recipe_carry_its_priority():
    recipe = Recipe(name="t", version=1, base_model="tiny-random-smollm2", model_name="t",
                    scheduling={"priority": "interactive"})
    _, attributes = ev.encode(ev.JobSubmitted(run_id="r", recipe=recipe, dataset_uri="file:///x"))
    assert attributes[ev.PRIORITY] == "interactive"
    _, attributes = ev.encode(ev.TrainingFailed(run_id="r", reason="x"))
    assert ev.PRIORITY not in attributes
