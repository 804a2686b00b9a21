"""The JAX versions that work: the installed one is in the pinned range, and a JAX release
that lacks an internal the kernels use fails with a message naming it and the range."""

import importlib.metadata
import pathlib
import re

import jax
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from eqx_attention import _jax_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins() -> dict[str, Requirement]:
    """The jax and jaxlib requirements of pyproject.toml (its `"jax>=...",` lines: tomllib
    is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    lines = re.findall(r'^\s*"((?:jax|jaxlib)[<>=!~][^"]*)",', text, re.MULTILINE)
    requirements = [Requirement(line) for line in lines]
    return {r.name: r for r in requirements}


def test_pins_are_the_checked_range():
    # pyproject.toml and the error messages state one range.
    pins = _pins()
    assert set(pins) == {"jax", "jaxlib"}
    for requirement in pins.values():
        assert requirement.specifier == Requirement(f"x{_jax_compat.JAX_RANGE}").specifier


@pytest.mark.parametrize("package", ["jax", "jaxlib"])
def test_installed_jax_is_in_the_pinned_range(package):
    # The suite tests what it pins: `make test` installs the newest jax the pin allows,
    # `make test-oldest` the lowest.
    installed = Version(importlib.metadata.version(package))
    assert installed in _pins()[package].specifier, (
        f"{package} {installed} is outside the tested range {_pins()[package].specifier}"
    )


def test_a_missing_internal_names_the_jax_version_and_the_range():
    with pytest.raises(ImportError) as error:
        _jax_compat._require("jax.interpreters.ad", "Zero", "no_such_rule")
    message = str(error.value)
    assert f"jax {jax.__version__}" in message
    assert "jax>=0.10.2,<0.12" in message
    assert "jax.interpreters.ad.no_such_rule" in message
    with pytest.raises(ImportError, match="jax.no_such_module"):
        _jax_compat._require("jax.no_such_module")


def test_abstract_values_without_a_manual_axis_type():
    # `aval.mat` is read with getattr: an aval without one varies over nothing, and typing
    # an output as varying then needs it.
    class Bare:
        pass

    assert _jax_compat.varying_axes(Bare()) == frozenset()
    plain = jax.typeof(jax.numpy.zeros(3))
    assert _jax_compat.varying_axes(plain) == frozenset()
    out = _jax_compat.shaped_array((2,), jax.numpy.float32, Bare(), frozenset())
    assert out.shape == (2,)
    with pytest.raises(RuntimeError, match="lacks ShapedArray.mat"):
        _jax_compat.shaped_array((2,), jax.numpy.float32, Bare(), frozenset({"x"}))
