"""The method registry: an explicit table, loud failures, overrides validated against each method's Hyperparams.

To add a method: write `methods/<name>.py` ending in a `METHOD = Method(...)` record (see methods/source_only.py and
docs/architecture.md), import it here and append it to `_METHODS`, and add `search_spaces/<name>.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from methods import adaptsegnet, cirn, cscl, seuda, slrt, source_only, tdtf
from methods.contract import Method


class UnknownMethodError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def _table(*records: Method) -> Mapping[str, Method]:
    table: dict[str, Method] = {}
    for record in records:
        if record.name in table:
            raise ValueError(f"duplicate method name {record.name!r} in the registry")
        table[record.name] = record
    return MappingProxyType(table)


_METHODS = (source_only.METHOD, adaptsegnet.METHOD, cscl.METHOD, seuda.METHOD, cirn.METHOD, tdtf.METHOD, slrt.METHOD)
REGISTRY: Mapping[str, Method] = _table(*_METHODS)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise UnknownMethodError(f"unknown method {name!r}; valid: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def hyperparam_names(method: Method) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(method.hyperparams))


def make_hyperparams(method: Method, overrides: Mapping[str, Any] | None = None) -> Any:
    """The method's paper defaults with `overrides` applied through `dataclasses.replace`.

    Raises ValueError naming the unknown key and the valid ones, or the range check that failed.
    """
    overrides = dict(overrides or {})
    valid = hyperparam_names(method)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown hyperparameter {unknown[0]!r} for {method.name}; valid: {', '.join(valid)}")
    return dataclasses.replace(method.hyperparams(), **overrides)
