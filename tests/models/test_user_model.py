"""load_model: a user's `package.module:function` becomes an nn.Module; a bad spec says what is wrong."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch.nn as nn

from models.user_model import load_model

PACKAGE = "tandem_test_usermodels"

NETS = """
import torch.nn as nn


def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


class Factory:
    @staticmethod
    def build():
        return nn.Linear(2, 3)


def not_a_model():
    return "resnet"


constant = 3
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """A package `PACKAGE` on sys.path: `nets` (good and bad factories) and `broken` (a failing import)."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    (pkg / "broken.py").write_text("import tandem_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
        del sys.modules[name]


def test_function_and_dotted_attribute(user_package):
    model = load_model(f"{PACKAGE}.nets:build")
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert load_model(f"{PACKAGE}.nets:build") is not model  # a fresh model per call
    assert isinstance(load_model(f"{PACKAGE}.nets:Factory.build"), nn.Linear)


@pytest.mark.parametrize(
    "spec", ["nets.build", "", ":build", "nets:", "a:b:c", "pkg..nets:build", "pkg.nets:1build", "pkg nets:f"]
)
def test_malformed_spec(spec):
    with pytest.raises(ValueError, match=r"model spec must look like 'package.module:function', got"):
        load_model(spec)


def test_spec_must_be_str():
    with pytest.raises(TypeError, match="model spec must be a str 'package.module:function', got Sequential"):
        load_model(nn.Sequential())


def test_missing_module_is_named(user_package):
    with pytest.raises(ImportError, match=rf"cannot import module '{PACKAGE}.nope' of model spec") as info:
        load_model(f"{PACKAGE}.nope:build")
    assert info.value.name == f"{PACKAGE}.nope"


def test_failing_import_inside_user_module(user_package):
    with pytest.raises(ImportError, match=rf"'{PACKAGE}.broken'.*tandem_no_such_dependency"):
        load_model(f"{PACKAGE}.broken:build")


def test_missing_function(user_package):
    with pytest.raises(ImportError, match=rf"cannot import name 'missing' from module '{PACKAGE}.nets'"):
        load_model(f"{PACKAGE}.nets:missing")


def test_not_callable(user_package):
    with pytest.raises(TypeError, match="must name a callable, got int"):
        load_model(f"{PACKAGE}.nets:constant")


def test_not_a_module(user_package):
    with pytest.raises(TypeError, match=r"must return an nn.Module, got str"):
        load_model(f"{PACKAGE}.nets:not_a_model")


def test_kwargs_and_num_classes_are_passed(tmp_path, monkeypatch):
    (tmp_path / "kw_models.py").write_text(
        "import torch.nn as nn\n"
        "def head(width=4, num_classes=2):\n"
        "    return nn.Linear(width, num_classes)\n"
        "def fixed(width=4):\n"
        "    return nn.Linear(width, 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_model("kw_models:head", {"width": 5}, num_classes=7)
    assert (m.in_features, m.out_features) == (5, 7)
    assert load_model("kw_models:head", {"num_classes": 9}, num_classes=7).out_features == 9  # explicit wins
    assert load_model("kw_models:fixed", None, num_classes=7).out_features == 3  # not passed when not taken
    with pytest.raises(TypeError, match="cannot be called with {'depth': 2}"):
        load_model("kw_models:fixed", {"depth": 2})


def test_runtime_env_ships_the_users_package(tmp_path, monkeypatch):
    """`tandem run --address` from a plain driver: the package holding the model's module goes to the workers as
    py_modules; nothing inside a Ray job or for an installed package; clear errors otherwise."""
    from pathlib import Path

    from models.user_model import JOB_CONFIG_ENV, runtime_env_for

    env = runtime_env_for("tests.models.tv_models:resnet18", environ={})
    assert env == {"py_modules": [str(Path(__file__).resolve().parents[1])]}  # the `tests` package directory
    assert runtime_env_for("tests.models.tv_models:resnet18", environ={JOB_CONFIG_ENV: "{}"}) is None
    assert runtime_env_for("numpy.linalg:norm", environ={}) is None  # installed: the nodes have it too
    with pytest.raises(ImportError, match="on this driver"):
        runtime_env_for("no_such_pkg_13.mod:fn", environ={})
    (tmp_path / "single_file_13.py").write_text("def fn():\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="single-file module"):
        runtime_env_for("single_file_13:fn", environ={})
