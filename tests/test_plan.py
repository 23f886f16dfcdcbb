"""Training-plan validation, hashing and the model registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from training_plan import PlanValidationError, load_plan, parse_plan, plan_hash
from training_plan.models import MODEL_REGISTRY, build_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plan-classification.yaml"
MINIMAL = "title: t\nmodel: {name: resnet10}\n"


def test_example_plan_is_valid() -> None:
    plan = load_plan(EXAMPLE)
    assert plan.task == "classification"
    assert plan.secure_aggregation.enabled
    assert len(plan_hash(plan)) == 64


def test_hash_ignores_order_comments_and_explicit_defaults() -> None:
    a = parse_plan("title: t\nmodel: {name: resnet10}\ntraining: {batch_size: 8}\n")
    b = parse_plan("# comment\nmodel:\n  name: resnet10\ntitle: t\n")
    assert plan_hash(a) == plan_hash(b)
    c = parse_plan("title: t\nmodel: {name: resnet10}\ntraining: {batch_size: 16}\n")
    assert plan_hash(a) != plan_hash(c)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "training: {lerning_rate: 0.1}\n", ":3:12: training.lerning_rate: unknown key"),
        ("title: t\nmodel: {name: vgg16}\n", "model.name: unknown model 'vgg16'"),
        ("model: {name: resnet10}\n", "title: required key is missing"),
        (MINIMAL + "training:\n  batch_size: 0\n", ":4:3: training.batch_size"),
        (MINIMAL + "federation: {min_silos: 2}\n", "min_silos must be at least 3"),
        (MINIMAL + "task: regression\n", "task"),
        ("title: [unclosed\n", "not valid YAML"),
        (
            "title: t\nmodel: {name: densenet121}\npreprocessing: {input_size: 32}\n",
            "input_size 32 is too small for densenet121 with instance norm: use at least 64",
        ),
        ("- a\n- b\n", "must be a YAML mapping"),
    ],
)
def test_malformed_plans_give_one_clear_line(text: str, expected: str) -> None:
    with pytest.raises(PlanValidationError) as info:
        parse_plan(text, source="plan.yaml")
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("plan.yaml")


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(PlanValidationError, match="plan file not found"):
        load_plan(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["resnet10", "efficientnet-b0", "densenet121"])
def test_registry_builds_from_scratch(name: str) -> None:
    import torch

    model = build_model(name)
    out = model(torch.zeros(2, 1, 64, 64))
    assert out.shape == (2, 1)
    assert name in MODEL_REGISTRY


_keys = st.sampled_from(
    ["title", "model", "training", "federation", "task", "preprocessing", "bogus", "schema_version"]
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5000)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_random_yaml_is_accepted_or_rejected_cleanly(data: dict) -> None:
    text = yaml.safe_dump(data)
    try:
        plan = parse_plan(text, source="random.yaml")
    except PlanValidationError as exc:
        assert str(exc).startswith("random.yaml") and "\n" not in str(exc)
    else:
        assert len(plan_hash(plan)) == 64
