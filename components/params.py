"""Parameter groups: each a frozen dataclass whose fields declare one parameter each, with its type and default.

A pipeline's signature (so the KFP dashboard's fields), the command line's typing and a step's input are derived
from the fields. A step takes a whole group as one dict input of the pipeline's parameters, whose values KFP fills
in when the step runs, as text (kfp.local by value; on the cluster the launcher substitutes them into the
executor input): from_values types them again by the group's fields.
"""

from __future__ import annotations

import dataclasses

from components.errors import StepError

KINDS = {"int": int, "float": float, "str": str, "bool": bool, "list": list}
# A field with metadata {"pipeline": False} is not a run's parameter (e.g. how many cores a fit uses).
INTERNAL = {"pipeline": False}


def kinds(group, internal: bool = True) -> dict[str, type]:
    """The group's fields (`internal`: also those that are not a run's parameters): name -> type."""
    return {f.name: KINDS[f.type] if isinstance(f.type, str) else f.type for f in dataclasses.fields(group)
            if internal or f.metadata.get("pipeline", True)}


def fields(group) -> dict[str, type]:
    """The group's run parameters: name -> type."""
    return kinds(group, internal=False)


def typed(kind: type, value, name: str):
    """`value` as `kind`; numbers may arrive as text or as floats (KFP hands whole numbers over as 31.0)."""
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: {value!r} is not true or false")
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}: {value!r} is not a string")
        return value
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ValueError(f"{name}: {value!r} is not a number")
    if kind is int and number != int(number):
        raise ValueError(f"{name}: {value!r} is not a whole number")
    return int(number) if kind is int else number


def replaced(params, changes: dict, allowed: tuple[str, ...] | None = None):
    """`params` (a group's instance) with `changes`, each typed as its field; a name not in `allowed` (default:
    every field of the group) is refused. Raises ValueError("name: problem")."""
    known = kinds(type(params))
    allowed = tuple(known) if allowed is None else allowed
    for name in changes:
        if name not in allowed:
            raise ValueError(f"{name}: not one of {sorted(allowed)}")
    return dataclasses.replace(params, **{name: typed(known[name], value, name) for name, value in changes.items()})


def from_values(group, values: dict, step: str, field: str):
    """The group as a step received it, checked field by field: a StepError names the step and the field."""
    if not isinstance(values, dict):
        raise StepError(step, field, f"expected the group's parameters by name, got {str(values)[:200]!r}")
    try:
        return replaced(group(), values)
    except ValueError as exc:
        name, _, problem = str(exc).partition(": ")
        raise StepError(step, name, problem) from exc
