"""Every derivative of a kernel whose backward pass is written by hand.

A `jax.custom_vjp` gives reverse mode only: `jvp` of it raises, and so does `grad` of its
backward pass wherever that loops with `lax.while_loop`. Here a kernel is instead a few JAX
primitives, each with the rules that make the others' derivatives:

- `attention(x) = (out, lse)`, the kernel's forward pass;
- `tangent(x; dx) = J(x) dx`, its Jacobian-vector product (forward mode);
- `backward(x; ct) = J(x)^T ct`, its hand-written backward pass (reverse mode);
- `hessian(x, ct; u) = d/de backward(x + e u; ct)`, the backward pass's own derivative;
- `second(x, dx; dy) = d/de tangent(x + e dy; dx)`, the tangent's own derivative.

`jvp` of `attention` is `tangent`. Reverse mode transposes `tangent`, which is linear in
`dx`: its transpose is `backward`. `backward` is linear in `ct`, with `tangent` as its
transpose, and its derivative in `x` is `hessian`. As the second derivative of the scalar
`<ct, attention(x)>`, `hessian` is symmetric in `u`, so it is its own transpose; for the
same reason `second`, linear in `dy`, transposes into `hessian` along `dx`. So `jvp`,
`grad`, `jvp` of `grad` (Hessian-vector products), `grad` of `grad` and `grad` of `jvp` all
run the kernels' own blockwise loops, in O(T) memory; nothing is differentiated through a
`while_loop` in reverse. Third and higher derivatives in forward mode differentiate the
kernels' code. Two more primitives run a `jvp` in one pass (`attention` with its tangent,
`backward` with its Hessian term) and split into those parts wherever JAX partially
evaluates them.

`x` holds the differentiable inputs (queries, keys, values, bias, sinks, `score_mod`'s
parameters); `aux` the rest (the spec's other leaves, the block plan), which carry no
derivative. The primitives also take the forward pass's `(out, lse)` so as not to recompute
it. Those are functions of `x`, so their own tangents are redundant: the rules account for
them through `x`, with one exception, `hessian`'s extra arguments `(du_out, du_lse)`, the
tangents of `(out, lse)` along `u`, which the caller already has (`J(x) u`).

Under `jax.vmap` a primitive is bound again with one more level of `vmapped`: per level,
which arguments carry that batch axis (moved to the front). Outputs are batched at a level
where some argument is (`(out, lse)` of a one-pass `jvp` only where an input of the forward
pass is); a cotangent for an argument that was not is summed over that level's axis.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

# JAX's own machinery for primitives, imported through the module that checks it exists.
from .._jax_compat import Primitive, Var, ad, batching, mlir, pe, shaped_array, varying_axes


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A kernel's forward and backward passes, hashable (a primitive parameter).

    `forward(x, aux) -> (out, lse)`; `backward(x, aux, out, lse, ct_out, ct_lse) -> dx`, in
    `x`'s structure and dtypes. Forward mode is `jax.jvp` of the forward pass, which carries
    the tangents of the online softmax's running state alongside it, block by block.
    """

    def forward(self, x, aux):
        raise NotImplementedError

    def backward(self, x, aux, out, lse, ct_out, ct_lse):
        raise NotImplementedError

    @property
    def differentiable(self) -> "Kernel":
        """The kernel whose code JAX differentiates (forward mode, and the backward pass's
        own derivative): this one, or one computing the same function in code that JAX can
        differentiate (for a Pallas kernel, the blockwise XLA kernel over the same plan)."""
        return self


def _forward_jvp(kernel: Kernel, x, aux, dx):
    """`((out, lse), (t_out, t_lse))`: the forward pass and its tangent along `dx`."""
    forward = kernel.differentiable.forward
    return jax.jvp(lambda x: forward(x, aux), (x,), (dx,))


def attention(kernel: Kernel, x, aux):
    """`kernel.forward(x, aux)`, differentiable in `x` in every mode and to any order."""
    xs, x_tree = jax.tree.flatten(x)
    auxs, aux_tree = jax.tree.flatten(aux)
    out, lse = _attention_p.bind(*xs, *auxs, kernel=kernel, trees=(x_tree, aux_tree), vmapped=())
    return out, lse


def _unpack(args, trees):
    """`(x, aux, rest)` from a primitive's flat arguments."""
    x_tree, aux_tree = trees
    nx, na = x_tree.num_leaves, aux_tree.num_leaves
    x = jax.tree.unflatten(x_tree, args[:nx])
    aux = jax.tree.unflatten(aux_tree, args[nx : nx + na])
    return x, aux, list(args[nx + na :])


def _run_attention(kernel, trees, *args):
    x, aux, _ = _unpack(args, trees)
    return list(kernel.forward(x, aux))


def _run_jvp(kernel, trees, *args):
    x, aux, dx = _unpack(args, trees)
    primals, tangents = _forward_jvp(kernel, x, aux, jax.tree.unflatten(trees[0], dx))
    return [*primals, *tangents]


# The tangent and the second derivative take (out, lse) for their transposes, which call
# the backward pass; their own code recomputes the forward pass inside `jax.jvp`.
def _run_tangent(kernel, trees, *args):
    x, aux, (_, _, *dx) = _unpack(args, trees)
    return list(_forward_jvp(kernel, x, aux, jax.tree.unflatten(trees[0], dx))[1])


def _run_second(kernel, trees, *args):
    """`D²f(x)[dx, dy]`: the tangent along `dx`, differentiated along `dy`."""
    nx, _ = _sizes(trees)
    x, aux, (_, _, *rest) = _unpack(args, trees)
    dx, dy = (jax.tree.unflatten(trees[0], r) for r in (rest[:nx], rest[nx + 2 :]))
    _, second = jax.jvp(lambda x: _forward_jvp(kernel, x, aux, dx)[1], (x,), (dy,))
    return list(second)


def _run_backward(kernel, trees, *args):
    x, aux, (out, lse, ct_out, ct_lse) = _unpack(args, trees)
    return jax.tree.leaves(kernel.backward(x, aux, out, lse, ct_out, ct_lse))


def _run_hessian(kernel, trees, *args):
    return _run_backward_jvp(kernel, trees, *args)[_sizes(trees)[0] :]


def _run_backward_jvp(kernel, trees, *args):
    """The backward pass and its derivative along `(u, du_out, du_lse)` and, when given,
    the cotangent's tangent `(dct_out, dct_lse)`."""
    nx, _ = _sizes(trees)
    x, aux, (out, lse, ct_out, ct_lse, *rest) = _unpack(args, trees)
    u, (du_out, du_lse), dct = (
        jax.tree.unflatten(trees[0], rest[:nx]),
        rest[nx : nx + 2],
        rest[nx + 2 :],
    )
    primals, tangents = (x, out, lse), (u, du_out, du_lse)
    if not dct:
        ct = (ct_out, ct_lse)
    else:
        primals, tangents, ct = primals + (ct_out, ct_lse), tangents + tuple(dct), ()

    def backward(x, out, lse, ct_out, ct_lse):
        return kernel.differentiable.backward(x, aux, out, lse, ct_out, ct_lse)

    dx, h = jax.jvp(lambda *p: backward(*p, *ct), primals, tangents)
    return jax.tree.leaves(dx) + jax.tree.leaves(h)


def _batched(run, kernel, trees, vmapped, out_axes):
    """`run` on the primitive's arguments, under its levels of `vmap` (innermost first).

    `out_axes(flags, trees)` says which outputs a level batches (`vmap`'s `out_axes`); a level
    in which no argument is batched adds no axis at all.
    """
    fn = functools.partial(run, kernel, trees)
    for flags in vmapped:
        if any(flags):
            in_axes = [0 if f else None for f in flags]
            fn = jax.vmap(fn, in_axes=in_axes, out_axes=out_axes(flags, trees))
    return fn


def _every_output(flags, trees):
    del flags, trees
    return 0


def _tangents_only(flags, trees):
    """`jvp`'s `(out, lse)` are batched only where an input of the forward pass is."""
    primal = 0 if any(flags[: _sizes(trees)[1]]) else None
    return [primal, primal, 0, 0]


def _backward_and_tangents(flags, trees):
    """The backward pass's jvp: its value is batched only where one of its own inputs is."""
    nx, n = _sizes(trees)
    primal = 0 if any(flags[: n + 4]) else None
    return [primal] * nx + [0] * nx


def _primitive(name: str, run, out_axes=_every_output) -> Primitive:
    p = Primitive(name)
    p.multiple_results = True

    def evaluate(*args, kernel, trees, vmapped):
        return _batched(run, kernel, trees, vmapped, out_axes)(*args)

    @functools.lru_cache(maxsize=256)
    def shapes(avals, kernel, trees, vmapped):
        outs = jax.eval_shape(
            functools.partial(evaluate, kernel=kernel, trees=trees, vmapped=vmapped), *avals
        )
        # Inside `shard_map`, an output varies over every mesh axis some input varies over.
        varying = frozenset().union(*(varying_axes(a) for a in avals))
        return [shaped_array(o.shape, o.dtype, avals[0], varying) for o in outs]

    def batch(args, dims, **params):
        flags = tuple(d is not None for d in dims)
        args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims, strict=True)]
        outs = p.bind(*args, **{**params, "vmapped": params["vmapped"] + (flags,)})
        axes = out_axes(flags, params["trees"])
        return outs, [axes] * len(outs) if isinstance(axes, int) else axes

    p.def_impl(jax.jit(evaluate, static_argnames=("kernel", "trees", "vmapped")))
    p.def_abstract_eval(lambda *avals, **params: shapes(avals, **params))
    mlir.register_lowering(p, mlir.lower_fun(evaluate, multiple_results=True))
    batching.primitive_batchers[p] = batch
    return p


_attention_p = _primitive("attention", _run_attention)
_jvp_p = _primitive("attention_jvp", _run_jvp, _tangents_only)
_tangent_p = _primitive("attention_tangent", _run_tangent)
_backward_p = _primitive("attention_backward", _run_backward)
_hessian_p = _primitive("attention_hessian", _run_hessian)
_second_p = _primitive("attention_second", _run_second)
_backward_jvp_p = _primitive("attention_backward_jvp", _run_backward_jvp, _backward_and_tangents)


def _levels(vmapped, *spans):
    """`vmapped` for a new primitive call, per level: flags copied from the calling one's
    arguments (a `slice`), or for `k` outputs of a primitive called with this level's flags
    (an `int`) or with those of a `slice` (`(k, slice)`): batched where any of those is."""

    def flags_of(flags, span):
        if isinstance(span, slice):
            return flags[span]
        k, within = (span, slice(None)) if isinstance(span, int) else span
        return (any(flags[within]),) * k

    return tuple(sum((flags_of(flags, s) for s in spans), ()) for flags in vmapped)


def _fit(ct, made_under, vmapped, index: int):
    """A cotangent, from a primitive called with levels `made_under`, for argument `index`
    of one called with `vmapped`: summed over the axes of levels that argument lacks."""
    if isinstance(ct, ad.Zero):
        return None
    axes, position = [], 0
    for made, flags in zip(reversed(made_under), reversed(vmapped), strict=True):
        if any(made):  # the level gave the cotangent an axis (outermost first)
            if not flags[index]:
                axes.append(position)
            position += 1
    return jnp.sum(ct, axis=tuple(axes)) if axes else ct


def _zero_like(primal):
    """A symbolic zero tangent for `primal`."""
    return ad.Zero(jax.typeof(primal).to_tangent_aval())


def _instantiate(tangents):
    return [ad.instantiate_zeros(t) for t in tangents]


def _all_zero(tangents) -> bool:
    return all(isinstance(t, ad.Zero) for t in tangents)


def _sizes(trees):
    x_tree, aux_tree = trees
    return x_tree.num_leaves, x_tree.num_leaves + aux_tree.num_leaves


def _defined(args, upto: int, what: str):
    if any(ad.is_undefined_primal(a) for a in args[:upto]):
        raise NotImplementedError(
            f"attention's {what} is linear only in its last arguments: reverse mode over "
            "forward mode is not supported; take jvp of grad (forward over reverse) instead"
        )


# jvp of the forward pass: one pass computing the output and its tangent together.
def _attention_jvp(primals, tangents, *, kernel, trees, vmapped):
    nx, n = _sizes(trees)
    if _all_zero(tangents[:nx]):
        out, lse = _attention_p.bind(*primals, kernel=kernel, trees=trees, vmapped=vmapped)
        return [out, lse], [_zero_like(out), _zero_like(lse)]
    levels = _levels(vmapped, slice(0, n), slice(0, nx))
    dx = _instantiate(tangents[:nx])
    out, lse, t_out, t_lse = _jvp_p.bind(*primals, *dx, kernel=kernel, trees=trees, vmapped=levels)
    return [out, lse], [t_out, t_lse]


# Where a jvp is split into a known primal part and a staged linear part (`grad`, `linearize`,
# `jax.checkpoint`, `scan`), a one-pass jvp primitive splits into its value (known) and its
# linear tangent (staged, and transposed in reverse mode). `split(trees, vmapped)` gives
# `(k, known, known_levels, m, staged, staged_levels, arrange)`: the first `k` arguments are
# the primal ones, `known` computes the first `m` outputs from them, `staged` the others
# from `arrange(primal arguments, primal outputs, tangent arguments)`.
def _partial_eval_rules(p: Primitive, split):
    def on_tracers(trace, *tracers, kernel, trees, vmapped):
        params = dict(kernel=kernel, trees=trees)
        k, known_p, known_levels, _, staged_p, staged_levels, arrange = split(trees, vmapped)
        known = [t.pval.get_known() for t in tracers[:k]]
        if any(c is None for c in known):
            return trace.default_process_primitive(p, tracers, dict(params, vmapped=vmapped))
        values = known_p.bind(*known, **params, vmapped=known_levels)
        values = [trace.new_const(v) for v in values]
        args = arrange(tracers[:k], values, tracers[k:])
        tangents = trace.default_process_primitive(
            staged_p, args, dict(params, vmapped=staged_levels)
        )
        return [*values, *tangents]

    def on_jaxpr(saveable, unks_in, inst_in, eqn):
        del saveable  # the values are O(T): always kept for the staged tangent
        trees, vmapped = eqn.params["trees"], eqn.params["vmapped"]
        k, known_p, known_levels, m, staged_p, staged_levels, arrange = split(trees, vmapped)
        num_out = len(eqn.outvars)
        if not any(unks_in):
            return eqn, None, [False] * num_out, [False] * num_out, []
        missing = [
            v for v, inst in zip(eqn.invars, inst_in, strict=True)
            if not inst and isinstance(v, Var)
        ]  # fmt: skip
        if any(unks_in[:k]):
            return None, eqn, [True] * num_out, [True] * num_out, missing
        values = eqn.outvars[:m]
        known = eqn.replace(
            primitive=known_p,
            invars=eqn.invars[:k],
            outvars=values,
            params=dict(eqn.params, vmapped=known_levels),
        )
        staged = eqn.replace(
            primitive=staged_p,
            invars=arrange(eqn.invars[:k], values, eqn.invars[k:]),
            outvars=eqn.outvars[m:],
            params=dict(eqn.params, vmapped=staged_levels),
        )
        # The staged tangent reads every argument (a known tangent, e.g. zeros, too).
        residuals = missing + list(values)
        unknown = [False] * m + [True] * (num_out - m)
        return known, staged, unknown, [True] * num_out, residuals

    pe.custom_partial_eval_rules[p] = on_tracers
    pe.partial_eval_jaxpr_custom_rules[p] = on_jaxpr


def _split_jvp(trees, vmapped):
    nx, n = _sizes(trees)
    return (
        n, _attention_p, _levels(vmapped, slice(0, n)), 2,
        _tangent_p, _levels(vmapped, slice(0, n), (2, slice(0, n)), slice(n, n + nx)),
        lambda args, values, tangents: [*args, *values, *tangents],
    )  # fmt: skip


def _split_backward_jvp(trees, vmapped):
    nx, n = _sizes(trees)
    return (
        n + 4, _backward_p, _levels(vmapped, slice(0, n + 4)), nx,
        _hessian_p, vmapped,
        lambda args, values, tangents: [*args, *tangents],
    )  # fmt: skip


# The one pass's derivative: along x, the tangent for (out, lse); for their tangents, the
# tangent along the new direction of dx plus the second derivative along (dx, new x). Each
# part is linear in the new directions and has a transpose, so `grad` of `jvp` (reverse over
# forward) runs blockwise too.
def _jvp_jvp(primals, tangents, *, kernel, trees, vmapped):
    params = dict(kernel=kernel, trees=trees)
    nx, n = _sizes(trees)
    outs = _jvp_p.bind(*primals, **params, vmapped=vmapped)
    out, lse, t_out, t_lse = outs
    dy, d_dx = tangents[:nx], tangents[n:]
    args = (*primals[:n], out, lse)
    values = (2, slice(0, n))  # out and lse: batched where an input of the forward pass is
    zeros = [_zero_like(o) for o in outs]
    d_values, d_tangents = zeros[:2], zeros[2:]
    if not _all_zero(dy):
        dy = _instantiate(dy)
        levels = _levels(vmapped, slice(0, n), values, slice(0, nx))
        d_values = _tangent_p.bind(*args, *dy, **params, vmapped=levels)
        levels = _levels(vmapped, slice(0, n), values, slice(n, n + nx), 2, slice(0, nx))
        d_tangents = _second_p.bind(
            *args, *primals[n:], t_out, t_lse, *dy, **params, vmapped=levels
        )
    if not _all_zero(d_dx):
        levels = _levels(vmapped, slice(0, n), values, slice(n, n + nx))
        along = _tangent_p.bind(*args, *_instantiate(d_dx), **params, vmapped=levels)
        d_tangents = along if isinstance(d_tangents[0], ad.Zero) else [
            a + b for a, b in zip(along, d_tangents, strict=True)
        ]  # fmt: skip
    return outs, [*d_values, *d_tangents]


# The second derivative D²f(x)[dx, dy] is linear in dy. For cotangents w it transposes into
# ∂ₓ(J(x)ᵀ w)·dx, the Hessian term along dx, by the symmetry of second derivatives.
def _second_transpose(cts, *args, kernel, trees, vmapped):
    params = dict(kernel=kernel, trees=trees)
    nx, n = _sizes(trees)
    _defined(args, n + 4 + nx, "second derivative")
    if _all_zero(cts):
        return [None] * len(args)
    # Arguments: x, aux, out, lse (n + 2), dx (nx), t_out, t_lse (2), then dy.
    levels = _levels(
        vmapped, slice(0, n + 2), 2, slice(n + 2, n + 2 + nx), slice(n + 2 + nx, n + 4 + nx)
    )
    hw = _hessian_p.bind(
        *args[: n + 2], *_instantiate(cts), *args[n + 2 : n + 4 + nx], **params, vmapped=levels
    )
    first = n + 4 + nx
    return [None] * first + [_fit(h, levels, vmapped, first + i) for i, h in enumerate(hw)]


# The tangent is linear in dx, with the backward pass as its transpose.
def _tangent_transpose(cts, *args, kernel, trees, vmapped):
    nx, n = _sizes(trees)
    _defined(args, n + 2, "tangent")
    if _all_zero(cts):
        return [None] * len(args)
    levels = _levels(vmapped, slice(0, n + 2), 2)
    dx = _backward_p.bind(
        *args[: n + 2], *_instantiate(cts), kernel=kernel, trees=trees, vmapped=levels
    )
    return [None] * (n + 2) + [_fit(d, levels, vmapped, n + 2 + i) for i, d in enumerate(dx)]


# The backward pass is linear in the cotangent, with the tangent as its transpose.
def _backward_transpose(cts, *args, kernel, trees, vmapped):
    nx, n = _sizes(trees)
    _defined(args, n + 2, "backward pass")
    if _all_zero(cts):
        return [None] * len(args)
    levels = _levels(vmapped, slice(0, n + 2), nx)
    t_out, t_lse = _tangent_p.bind(
        *args[: n + 2], *_instantiate(cts), kernel=kernel, trees=trees, vmapped=levels
    )
    return [None] * (n + 2) + [
        _fit(t_out, levels, vmapped, n + 2),
        _fit(t_lse, levels, vmapped, n + 3),
    ]


# The backward pass's derivative, in one pass with its value: along x, the Hessian term;
# along the cotangent, itself. Tangents of its out/lse arguments are those of functions of
# x, which the Hessian term's transpose accounts for.
def _backward_jvp(primals, tangents, *, kernel, trees, vmapped):
    params = dict(kernel=kernel, trees=trees)
    nx, n = _sizes(trees)
    u, dct = tangents[:nx] + tangents[n : n + 2], tangents[n + 2 :]
    if _all_zero(u) and _all_zero(dct):
        dx = _backward_p.bind(*primals, **params, vmapped=vmapped)
        return dx, [_zero_like(d) for d in dx]
    spans = [slice(0, n + 4), slice(0, nx), slice(n, n + 2)]
    args = [*primals, *_instantiate(u)]
    if not _all_zero(dct):
        spans, args = spans + [slice(n + 2, n + 4)], args + _instantiate(dct)
    outs = _backward_jvp_p.bind(*args, **params, vmapped=_levels(vmapped, *spans))
    return outs[:nx], outs[nx:]


# The Hessian term is symmetric in u: its transpose is itself. Its (du_out, du_lse) are
# J(x) u; their share of the transpose is in the full Hessian, so theirs is zero. Along
# the cotangent's tangent (when given) it is the backward pass, whose transpose is J(x).
def _hessian_transpose(cts, *args, kernel, trees, vmapped):
    params = dict(kernel=kernel, trees=trees)
    nx, n = _sizes(trees)
    _defined(args, n + 4, "Hessian term")
    if _all_zero(cts):
        return [None] * len(args)
    w = _instantiate(cts)
    tangent_levels = _levels(vmapped, slice(0, n + 2), nx)
    dw = _tangent_p.bind(*args[: n + 2], *w, **params, vmapped=tangent_levels)
    levels = _levels(vmapped, slice(0, n + 4), nx, 2)
    hw = _hessian_p.bind(*args[: n + 4], *w, *dw, **params, vmapped=levels)
    cts = [None] * (n + 4) + [_fit(h, levels, vmapped, n + 4 + i) for i, h in enumerate(hw)]
    cts += [None, None]
    if len(args) > n + 6 + nx:  # the cotangent's tangent is an argument
        cts += [_fit(d, tangent_levels, vmapped, n + 6 + nx + i) for i, d in enumerate(dw)]
    return cts


# Derivatives the rules above do not build (forward mode over the tangent, the Hessian term,
# the second derivative or a one-pass backward jvp: third order) differentiate the code.
def _differentiate_code(run, out_axes=_every_output):
    def jvp(primals, tangents, *, kernel, trees, vmapped):
        fn = _batched(run, kernel, trees, vmapped, out_axes)
        return jax.jvp(fn, list(primals), _instantiate(tangents))

    return jvp


ad.primitive_jvps[_attention_p] = _attention_jvp
ad.primitive_jvps[_jvp_p] = _jvp_jvp
_partial_eval_rules(_jvp_p, _split_jvp)
ad.primitive_jvps[_tangent_p] = _differentiate_code(_run_tangent)
ad.primitive_transposes[_tangent_p] = _tangent_transpose
ad.primitive_jvps[_backward_p] = _backward_jvp
ad.primitive_transposes[_backward_p] = _backward_transpose
ad.primitive_jvps[_hessian_p] = _differentiate_code(_run_hessian)
ad.primitive_jvps[_second_p] = _differentiate_code(_run_second)
ad.primitive_transposes[_second_p] = _second_transpose
ad.primitive_jvps[_backward_jvp_p] = _differentiate_code(_run_backward_jvp, _backward_and_tangents)
_partial_eval_rules(_backward_jvp_p, _split_backward_jvp)
ad.primitive_transposes[_hessian_p] = _hessian_transpose
