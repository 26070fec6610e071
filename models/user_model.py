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


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job supervisor for a driver started by `ray job submit`: its runtime_env already ships the code."""


def runtime_env_for(spec: str, environ: dict | None = None) -> dict | None:
    """The Ray runtime_env that ships the package holding model `spec`'s module to the workers, trials and
    replicas of a cluster this driver connects to: `{"py_modules": [<package directory>]}`. None where nothing
    needs shipping: inside a Ray job (its runtime_env has the code, `ray job submit --working-dir`) or for a
    package installed in site-packages (installed on the cluster's nodes like any dependency). Raises ImportError
    when the module does not import here, ValueError for a top-level single-file module (py_modules takes
    directories: make it a package, or submit the run as a job with --working-dir)."""
    import importlib.util
    import os
    import sysconfig
    from pathlib import Path

    environ = os.environ if environ is None else environ
    if JOB_CONFIG_ENV in environ:
        return None
    module_name, sep, _ = spec.partition(":")
    if not (isinstance(spec, str) and sep and _dotted(module_name)):
        raise ValueError(f"model spec must look like 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"cannot import module {module_name!r} of model spec {spec!r} on this driver: {e}; the package must be "
            "importable here (on sys.path or installed) to be shipped to the cluster",
            name=module_name,
        ) from e
    top = module_name.split(".")[0]
    found = importlib.util.find_spec(top)
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise ValueError(
            f"model spec {spec!r}: {top!r} is a single-file module ({getattr(module, '__file__', '?')}); Ray ships "
            "directories: put it in a package (a directory with __init__.py) or submit the run as a Ray job with "
            "--working-dir"
        )
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    # a namespace package (no __init__.py) may span several directories: ship the one holding this module
    file = Path(getattr(module, "__file__", None) or locations[0]).resolve()
    package_dir = next((p for p in map(Path, locations) if p.resolve() in file.parents), Path(locations[0])).resolve()
    if any(p == package_dir or p in package_dir.parents for p in site):
        return None
    return {"py_modules": [str(package_dir)]}
