"""`convert`: the tinker SDK's objects (and any other package's of the same class names) as this
package's, so a Tinker loop's `Datum`s, `AdamParams` and `SamplingParams` are taken as they are."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

__all__ = ["convert"]


def convert(value: Any, cls: type, what: str) -> Any:
    """`value` as a `cls` of this module. An object of another package whose class has the same
    name (the tinker SDK's `Datum`, `ModelInput`, `AdamParams`, `SamplingParams`, ...) is
    converted field by field; anything else raises TypeError naming both classes."""
    if isinstance(value, cls):
        return value
    if type(value).__name__ != cls.__name__:
        raise TypeError(f"{what}: expected {_qualified(cls)}, got {_qualified(type(value))}")
    names = [f.name for f in fields(cls)]
    try:
        return cls(**{name: getattr(value, name) for name in names if hasattr(value, name)})
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{what}: cannot convert {_qualified(type(value))} to {_qualified(cls)}: {exc}") from None


def _qualified(cls: type) -> str:
    if cls.__module__ == "builtins":
        return cls.__qualname__
    module = "cispo.client" if cls.__module__.startswith("cispo.client.") else cls.__module__
    return f"{module}.{cls.__qualname__}"
