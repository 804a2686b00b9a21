"""The docstrings cannot rot: every ```python block in a public docstring runs, and every
argument list renders as a list.

mkdocstrings renders the docstrings of `eqx_attention.__all__` (classes with their
`__init__`, `__call__` and public methods) into the API pages; each docstring with examples
is one test, `test_docstring_example[MultiheadAttention]`, whose blocks run in order in one
namespace. The namespace starts with only `jax`, `jnp`, `eqx` and `eqx_attention`, so an
example imports anything else it uses and defines its own inputs. Tracebacks point at the
docstring's lines in the source file.

There is no marker to skip a block: every example runs, on one CPU device and in a few
seconds. One that is about several devices builds its mesh from `jax.devices()`, so that it
also runs on one.

Each `**Arguments:**` section is rendered by python-markdown with the site's extensions
(`mkdocs.yml`), as mkdocstrings renders it, and every argument it names must start a list
item of its own: a paragraph without blank lines around it inside the list turns the items
after it into one run-on paragraph.
"""

import ast
import inspect
import pathlib
import re
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import markdown
import pytest
import yaml
from test_docs import ROOT, python_blocks_in

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


# One item of an argument list: "- `query`: ..." or "- `mask`, `is_causal`: ...".
_ARGUMENT_ITEM = re.compile(r"^- ((?:`\w+`(?:, | and )?)+)")
_RENDERED_ITEM = re.compile(r"<li>\s*(?:<p>)?\s*<code>(\w+)</code>")


def _site_markdown() -> markdown.Markdown:
    """python-markdown with the extensions and options of `mkdocs.yml`."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    extensions, options = [], {}
    for entry in config["markdown_extensions"]:
        if isinstance(entry, dict):
            ((name, settings),) = entry.items()
            extensions.append(name)
            options[name] = settings or {}
        else:
            extensions.append(entry)
    return markdown.Markdown(extensions=extensions, extension_configs=options)


def argument_items(doc: str) -> list[list[str]]:
    """The names each item of a docstring's `**Arguments:**` list starts with, in order."""
    lines = doc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("**Arguments:**")), None)
    if start is None:
        return []
    # The section ends at the next bold heading: **Returns:**, **Positions.**, ...
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("**")), len(lines))
    return [
        re.findall(r"`(\w+)`", item[1])
        for line in lines[start + 1 : end]
        if (item := _ARGUMENT_ITEM.match(line))
    ]


def unrendered_arguments(doc: str) -> list[str]:
    """The arguments of `doc`'s argument list that do not start a rendered list item."""
    rendered = set(_RENDERED_ITEM.findall(_site_markdown().convert(doc)))
    return [names[0] for names in argument_items(doc) if names[0] not in rendered]


ARGUMENT_LISTS = {
    name: obj for name, obj in _documented() if obj.__doc__ and argument_items(inspect.getdoc(obj))
}


@pytest.mark.parametrize("name", ARGUMENT_LISTS)
def test_arguments_render_as_a_list(name):
    obj = ARGUMENT_LISTS[name]
    doc = inspect.getdoc(obj)
    unrendered = unrendered_arguments(doc)
    assert not unrendered, (
        f"eqx_attention.{name}'s **Arguments:** list renders {unrendered} inside a paragraph,"
        " not as list items: put a blank line before and after any paragraph in the list"
    )
    # And the names are the function's own, so a renamed parameter cannot keep its old entry.
    parameters = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    unknown = [n for names in argument_items(doc) for n in names if n not in parameters]
    assert not unknown, f"eqx_attention.{name} documents arguments it does not take: {unknown}"


def test_argument_list_check():
    # Guards the check itself, on the two shapes of the mistake and the fix.
    good = "**Arguments:**\n\n- `a`: one.\n- `b`, `c`: two,\n  continued.\n\n**Returns:**\n\nx."
    assert argument_items(good) == [["a"], ["b", "c"]]
    assert unrendered_arguments(good) == []
    run_on = "**Arguments:**\n\n- `a`: one.\n\nA paragraph.\n- `b`: two.\n- `c`: three.\n"
    assert unrendered_arguments(run_on) == ["b", "c"]
    # The collection finds the argument lists, this one's among them.
    assert "dot_product_attention" in ARGUMENT_LISTS
    assert len(ARGUMENT_LISTS) > 20
