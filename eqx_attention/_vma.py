"""Varying manual axes: how `shard_map` (with `check_vma=True`) types values by the mesh axes
they differ over, and the casts that make fresh values agree with their inputs."""

import jax
import jax.extend

from . import _jax_compat


def vary(tree, axes):
    """Cast the arrays of `tree` to vary over `axes` (those they do not vary over yet).

    `shard_map` type-checks loop carries and the operands of each primitive: fresh zeros
    and captured constants are device-invariant until cast to match the inputs.
    """

    def cast(x):
        missing = tuple(a for a in axes if a not in varying_axes(x))
        if not missing:
            return x
        return _jax_compat.pvary(x, missing)

    return jax.tree.map(cast, tree)


def vma(*xs) -> tuple:
    """The mesh axes any of the arrays in `xs` varies over, in a fixed order."""
    axes = set()
    for x in jax.tree.leaves(xs):
        axes |= set(varying_axes(x))
    return tuple(sorted(axes, key=str))


def varying_axes(x) -> frozenset:
    """The manual axes a value varies over: `aval.mat.varying` in newer jax, `aval.vma` before."""
    return _jax_compat.varying_axes(jax.typeof(x))


def eval_jaxpr(jaxpr: jax.extend.core.Jaxpr, consts, *args, rule=None) -> list:
    """Evaluate `jaxpr`, first casting each equation's inputs to the axes any of them varies over.

    A jaxpr traced outside `shard_map` (a mod, traced once on scalars) mixes its arguments
    with literals and captured arrays that `shard_map` types as device-invariant; tracing the
    same code inside would have inserted these casts. Outside `shard_map` nothing varies and
    this is plain evaluation. Nested `jit`s are evaluated inline, the same way. `rule(eqn,
    inputs)`, when given, evaluates the equations it returns outputs for (not `None`).
    """
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var):
        return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        outputs = None if rule is None else rule(eqn, inputs)
        if outputs is None:
            inputs = vary(inputs, vma(*inputs))
            if eqn.primitive.name == "jit":
                inner = eqn.params["jaxpr"]
                outputs = eval_jaxpr(inner.jaxpr, inner.consts, *inputs, rule=rule)
            else:
                outputs = eqn.primitive.bind(*inputs, **eqn.params)
                outputs = outputs if eqn.primitive.multiple_results else [outputs]
        env.update(zip(eqn.outvars, outputs, strict=True))
    return [read(var) for var in jaxpr.outvars]
