"""The JAX internals this library uses, imported and checked in one place.

The kernels are JAX primitives with differentiation, batching, lowering and
partial-evaluation rules of their own (`_kernels/_autodiff.py`), typed for `shard_map`'s
varying axes (`_vma.py`); mods are traced to jaxprs and evaluated again (`_vma.py`,
`_spec.py`); block plans batch with `custom_vmap` (`_kernels/_plan.py`); the GPU kernels are
written in Pallas (`_kernels/_pallas.py`). None of these are covered by JAX's compatibility
promise, so each is checked when the package is imported, and one that a JAX release lacks
raises an `ImportError` naming that release and the tested range (`JAX_RANGE`, the pin in
`pyproject.toml`), instead of an `AttributeError` deep in a trace. Why each is needed is in
`docs/guides/implementations.md`.
"""

import importlib

import jax

# The versions of jax and jaxlib that are tested; pyproject.toml pins the same range.
JAX_RANGE = ">=0.10.2,<0.12"


def unsupported(name: str) -> str:
    """The message for a JAX internal `name` that this JAX lacks."""
    return f"eqx_attention needs jax{JAX_RANGE}; jax {jax.__version__} lacks {name}"


def _require(module: str, *names: str):
    """`module`, checked to have the attributes `names` (dotted paths within it), or an
    ImportError naming the first thing that is missing."""
    try:
        found = importlib.import_module(module)
    except ImportError as error:
        raise ImportError(unsupported(module)) from error
    for name in names:
        value = found
        for part in name.split("."):
            if not hasattr(value, part):
                raise ImportError(unsupported(f"{module}.{name}"))
            value = getattr(value, part)
    return found


_core = _require("jax.extend.core", "Jaxpr", "JaxprEqn.replace", "Literal", "Primitive", "Var")
Jaxpr, Literal, Primitive, Var = _core.Jaxpr, _core.Literal, _core.Primitive, _core.Var
ad = _require(
    "jax.interpreters.ad",
    "Zero",
    "instantiate_zeros",
    "is_undefined_primal",
    "primitive_jvps",
    "primitive_transposes",
)
batching = _require("jax.interpreters.batching", "primitive_batchers")
mlir = _require("jax.interpreters.mlir", "register_lowering", "lower_fun")
pe = _require(
    "jax.interpreters.partial_eval",
    "custom_partial_eval_rules",
    "partial_eval_jaxpr_custom_rules",
    "PartialVal.get_known",
)
ShapedArray = _require("jax.core", "ShapedArray.to_tangent_aval").ShapedArray
custom_vmap = _require("jax.custom_batching", "custom_vmap").custom_vmap
typeof = _require("jax", "typeof").typeof
# The Pallas kernels (`_kernels/_pallas.py`), and their Triton compiler options on a GPU.
_require(
    "jax.experimental.pallas", "pallas_call", "BlockSpec", "ds", "program_id", "next_power_of_2"
)
_require("jax.experimental.pallas.triton", "CompilerParams")
# The cast to more varying axes is `pcast(..., to="varying")`, earlier `pvary`.
if hasattr(jax.lax, "pcast"):

    def pvary(x, axes):
        return jax.lax.pcast(x, axes, to="varying")

else:
    pvary = _require("jax.lax", "pvary").pvary


def varying_axes(aval) -> frozenset:
    """The `shard_map` axes an abstract value varies over: `aval.mat.varying` in this JAX
    (earlier `aval.vma`); none where it has neither, as outside `shard_map`."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def shaped_array(shape, dtype, like, varying: frozenset):
    """A `ShapedArray` that varies over the `shard_map` axes `varying`, typed like the
    abstract value `like` otherwise (its manual axis type and mesh)."""
    if not varying:
        return ShapedArray(shape, dtype)
    mat = getattr(like, "mat", None)
    if mat is None:
        raise RuntimeError(unsupported("ShapedArray.mat (an abstract value's manual axis type)"))
    sharding = jax.sharding.NamedSharding(like.sharding.mesh, jax.sharding.PartitionSpec())
    try:
        return ShapedArray(
            shape, dtype, sharding=sharding, manual_axis_type=mat.update(varying=varying)
        )
    except TypeError as error:
        raise RuntimeError(unsupported("ShapedArray(..., manual_axis_type=)")) from error
