"""A user's model, named as `package.module:function` (a function or class returning an nn.Module)."""

from __future__ import annotations

import importlib
import inspect

import torch.nn as nn


def load_model(spec: str, kwargs: dict | None = None, num_classes: int | None = None) -> nn.Module:
    """Imports `package.module`, calls `function(**kwargs)` (a dotted path like `Class.build` is allowed; with
    `num_classes=` added when the function takes that argument and `kwargs` do not set it) and returns the
    nn.Module it makes.

    A malformed spec raises ValueError; a module or name that cannot be imported, ImportError; a target that
    is not callable or does not return an nn.Module, TypeError.
    """
    if not isinstance(spec, str):
        raise TypeError(f"model spec must be a str 'package.module:function', got {type(spec).__name__}")
    module_name, sep, attr = spec.partition(":")
    if not (sep and _dotted(module_name) and _dotted(attr)):
        raise ValueError(f"model spec must look like 'package.module:function', got {spec!r}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as e:
        msg = f"cannot import module {module_name!r} of model spec {spec!r}: {e}"
        raise ImportError(msg, name=module_name) from e
    for part in attr.split("."):
        if not hasattr(target, part):
            msg = f"cannot import name {attr!r} from module {module_name!r} (model spec {spec!r})"
            raise ImportError(msg, name=module_name)
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"model spec {spec!r} must name a callable, got {type(target).__name__}")
    kwargs = dict(kwargs or {})
    if num_classes is not None and "num_classes" not in kwargs and _takes(target, "num_classes"):
        kwargs["num_classes"] = num_classes
    try:
        model = target(**kwargs)
    except TypeError as e:
        raise TypeError(f"model spec {spec!r} cannot be called with {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec!r} must return an nn.Module, got {type(model).__name__}")
    return model


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _takes(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
