"""Reading a plan file: YAML -> validated TrainingPlan, with errors that point at the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from training_plan.errors import PlanValidationError
from training_plan.schema import TrainingPlan


def _key_lines(text: str) -> dict[tuple[Any, ...], tuple[int, int]]:
    """Map each key path of a YAML document to the (line, column) where its value is written."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    positions: dict[tuple[Any, ...], tuple[int, int]] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                mark = key_node.start_mark
                positions[(*path, key)] = (mark.line + 1, mark.column + 1)
                walk(value_node, (*path, key))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                positions[(*path, index)] = (item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, (*path, index))

    if root is not None:
        walk(root, ())
    return positions


def parse_plan(text: str, source: str = "<plan>") -> TrainingPlan:
    """Validate YAML text as a training plan.

    Raises PlanValidationError with one line: the file, line and column, the key and what is wrong.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanValidationError(
            f"{where}: not valid YAML ({problem})",
            source=source,
            line=mark.line + 1 if mark else None,
        ) from None
    if not isinstance(data, dict):
        raise PlanValidationError(
            f"{source}: a plan must be a YAML mapping of keys (title, model, ...), "
            f"got {type(data).__name__}",
            source=source,
        )
    try:
        return TrainingPlan.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        positions = _key_lines(text)
        line_col = None
        for cut in range(len(loc), 0, -1):
            if loc[:cut] in positions:
                line_col = positions[loc[:cut]]
                break
        where = f"{source}:{line_col[0]}:{line_col[1]}" if line_col else source
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see examples/plan-classification.yaml)"
        elif first["type"] == "missing":
            message = "required key is missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        more = len(exc.errors()) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise PlanValidationError(
            f"{where}: {key}: {message}{suffix}",
            source=source,
            key=key,
            line=line_col[0] if line_col else None,
        ) from None


def load_plan(path: Path | str) -> TrainingPlan:
    """Read and validate a plan file; a missing or unreadable file is a PlanValidationError too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanValidationError(
            f"{path}: plan file not found (write one with 'fedsilo plan new')", source=str(path)
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanValidationError(
            f"{path}: cannot read plan file ({exc})", source=str(path)
        ) from None
    return parse_plan(text, source=str(path))
