"""The docstring examples cannot rot: every ```python block in a public docstring runs.

mkdocstrings renders the docstrings of `eqx_attention.__all__` (classes with their
`__init__`, `__call__` and public methods) into the API pages; each docstring with examples
is one test, `test_docstring_example[MultiheadAttention]`, whose blocks run in order in one
namespace. The namespace starts with only `jax`, `jnp`, `eqx` and `eqx_attention`, so an
example imports anything else it uses and defines its own inputs. Tracebacks point at the
docstring's lines in the source file.

There is no marker to skip a block: every example runs, on one CPU device and in a few
seconds. One that is about several devices builds its mesh from `jax.devices()`, so that it
also runs on one.
"""

import ast
import inspect
import pathlib
import re
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from test_docs import python_blocks_in

import eqx_attention

PACKAGE = pathlib.Path(eqx_attention.__file__).resolve().parent


def _documented():
    """`(name, object)` of each docstring mkdocstrings renders; an alias (`QKVAttention` is
    `CrossAttention`) once, under its first name."""
    seen = set()
    for name in eqx_attention.__all__:
        obj = getattr(eqx_attention, name)
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield name, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                if isinstance(member, property):
                    member = member.fget
                member = inspect.unwrap(getattr(member, "__func__", member))
                if inspect.isfunction(member):
                    yield f"{name}.{attr}", member


def _docstring_start(obj) -> tuple[str, int]:
    """The source file of `obj` and the line of that file holding the first line of
    `inspect.getdoc(obj)`."""
    obj = inspect.unwrap(obj)
    lines, start = inspect.getsourcelines(obj)
    definition = ast.parse(textwrap.dedent("".join(lines))).body[0]
    # getdoc drops the blank lines a docstring may start with.
    blank = next(i for i, line in enumerate(obj.__doc__.splitlines()) if line.strip())
    path = str(pathlib.Path(inspect.getsourcefile(obj)).resolve())
    return path, start + definition.body[0].lineno - 1 + blank


def _examples() -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """`{name: (source file, [(line in that file, code), ...])}` of each docstring that has
    ```python blocks."""
    examples = {}
    for name, obj in _documented():
        # Only an object's own docstring: getdoc would fill in a method's from a base class.
        doc = inspect.getdoc(obj) if obj.__doc__ else None
        blocks = python_blocks_in(doc, f"eqx_attention.{name}'s docstring") if doc else []
        if blocks:
            path, start = _docstring_start(obj)
            examples[name] = (path, [(start + line - 1, code) for line, code in blocks])
    return examples


EXAMPLES = _examples()


@pytest.mark.parametrize("name", EXAMPLES)
def test_docstring_example(name):
    path, blocks = EXAMPLES[name]
    namespace = dict(__name__="__main__", jax=jax, jnp=jnp, eqx=eqx, eqx_attention=eqx_attention)
    for i, (line, code) in enumerate(blocks, 1):
        # Pad with newlines so the compiled code's line numbers are the source file's.
        compiled = compile("\n" * (line - 1) + code, path, "exec")
        try:
            exec(compiled, namespace)
        except Exception as error:
            raise AssertionError(
                f"example {i} of eqx_attention.{name}'s docstring ({path}:{line}) failed"
            ) from error


def test_every_docstring_example_is_collected():
    # Guards the collection: every ```python fence in the package's source is run, once, by
    # test_docstring_example, so examples cannot be skipped silently (or run twice).
    collected = sorted(
        (path, line, code) for path, blocks in EXAMPLES.values() for line, code in blocks
    )
    in_sources = sorted(
        (str(path), line, code)
        for path in PACKAGE.rglob("*.py")
        for line, code in python_blocks_in(path.read_text(), str(path))
    )
    # Counted without the parser, which a regression could make find nothing in both.
    fences = sum(
        len(re.findall(r"^[ \t]*`{3,}python[ \t]*$", path.read_text(), re.MULTILINE))
        for path in PACKAGE.rglob("*.py")
    )
    assert len(collected) > 0
    assert collected == in_sources, "a ```python block outside the public docstrings, or run twice"
    assert len(in_sources) == fences
