"""The online-softmax block step shared by the chunked kernel and ring attention."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .._spec import AttentionSpec, replace

# The logit of a hidden pair, and the log-sum-exp of a row that sees no key. Finite, unlike
# -inf, so that `jax.debug_infs(True)` raises no false alarm (jax issue 37422); as jax.nn,
# 0.7 of float32's range leaves room to subtract a row maximum without overflow, and
# `exp(MASKED - m)` is exactly zero for any real row maximum `m`.
MASKED = -0.7 * float(np.finfo(np.float32).max)

# Running (max, normaliser, unnormalised output) of one query block.
Carry = tuple[Float[Array, "K G bq"], Float[Array, "K G bq"], Float[Array, "K G bq dv"]]


def raw_logits(q: Float[Array, "K G bq d"], k: Float[Array, "K bk d"]) -> Float[Array, "K G bq bk"]:
    return jnp.einsum("kgqd,kcd->kgqc", q, k, preferred_element_type=jnp.float32)


@jax.custom_jvp
def fused_logits(
    q: Float[Array, "K G bq d"], k: Float[Array, "K bk d"]
) -> Float[Array, "K G bq bk"]:
    """[`raw_logits`][], whose tangent `q'k^T + qk'^T` is one product over a doubled head axis,
    `[q', q] [k, k']^T`, rather than two products and their sum.

    With it, forward mode measured 3-5% faster and Hessian-vector products 5-7% (the head
    axis, 64 wide, is a short product to stream a block's logits through). JAX cannot
    transpose this tangent (both factors of its product carry tangents), so it is only for
    code whose reverse mode is written by hand, never derived: the kernels whose derivatives
    `_autodiff.py` builds.
    """
    return raw_logits(q, k)


@fused_logits.defjvp
def _fused_logits_jvp(primals, tangents):
    (q, k), (q_dot, k_dot) = primals, tangents
    paired = raw_logits(jnp.concatenate([q_dot, q], -1), jnp.concatenate([k, k_dot], -1))
    return raw_logits(q, k), paired


def init_carry(q: Float[Array, "K G bq d"], vo_size: int) -> Carry:
    shape = q.shape[:3]
    return (
        jnp.full(shape, MASKED, jnp.float32),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros(shape + (vo_size,), jnp.float32),
    )


def block_forward(
    carry: Carry,
    q: Float[Array, "K G bq d"],
    k: Float[Array, "K bk d"],
    v: Float[Array, "K bk dv"],
    spec: AttentionSpec,
    q_idx: Int[Array, " bq"],
    kv_idx: Int[Array, " bk"],
    bias: Float[Array, "_ _ _ _"] | None,
    visible: Bool[Array, "_ _ #bq #bk"] | None,
    logits=raw_logits,
) -> Carry:
    """Fold one key/value block into the running softmax of a query block.

    `logits` computes `q k^T`: [`raw_logits`][], or [`fused_logits`][] in the kernels whose
    derivatives `_autodiff.py` builds.
    """
    m, denom, acc = carry
    s = spec.scores(logits(q, k), q_idx, kv_idx, bias)
    if visible is not None:
        s = jnp.where(visible, s, MASKED)
    # The running maximum only keeps exp in range: the output and log-sum-exp do not depend
    # on it, so it carries no tangent. That spares forward mode the max's own derivative (a
    # search for where the maximum lies, several passes over the block) for an exact zero.
    m_new = jnp.maximum(m, jax.lax.stop_gradient(jnp.max(s, axis=-1)))
    m_safe, correction = _shift(m, m_new)
    p = jnp.exp(s - m_safe[..., None])
    denom = denom * correction + jnp.sum(p, axis=-1)
    if spec.dropout_p is not None:
        p = jnp.where(spec.keep(q_idx, kv_idx), p / (1 - spec.dropout_p), 0.0)
    pv = jnp.einsum("kgqc,kcd->kgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, denom, acc * correction[..., None] + pv


def _shift(m: Float[Array, "*rows"], m_new: Float[Array, "*rows"]):
    """The running max to subtract before `exp`, and the factor rescaling the old state."""
    # Rows that have seen no visible key keep m = MASKED; shift them by 0 so that exp gives
    # exact zeros (exp(MASKED - MASKED) would be one).
    m_safe = jnp.where(m_new > MASKED, m_new, 0.0)
    return m_safe, jnp.exp(m - m_safe)


def block_backward(
    q: Float[Array, "K G bq d"],
    k: Float[Array, "K bk d"],
    v: Float[Array, "K bk dv"],
    d_out: Float[Array, "K G bq dv"],
    lse: Float[Array, "K G bq"],
    delta: Float[Array, "K G bq"],
    spec: AttentionSpec,
    q_idx: Int[Array, " bq"],
    kv_idx: Int[Array, " bk"],
    bias: Float[Array, "_ _ _ _"] | None,
    visible: Bool[Array, "_ _ #bq #bk"] | None,
    q_t: Float[Array, "K G d bq"],
    d_out_t: Float[Array, "K G dv bq"],
    logits=raw_logits,
):
    """Gradients of one (query block, key block) pair, recomputed from the saved lse.

    `delta = rowsum(d_out * out)`; `q_t` and `d_out_t` are `q` and `d_out` with their last
    two axes swapped. Returns `(dq, dk_t, dv_t, dbias, dmod)` for this block, with the key
    gradients transposed (`[K, d, bk]`): the products that sum over the queries then read
    both operands in the order they lie, which on CPU runs 2.4x faster than reading one
    transposed (measured at 512 x 256 blocks). `dbias` has the block's bias shape (or is
    `None` without a bias), `dmod` is the gradient of the arrays `score_mod` captured (see
    [`score_mod_params`][]), for the caller to sum. `logits` is as in [`block_forward`][],
    for the two products over the head axis (`q k^T` and `d_out v^T`).
    """
    params, static = score_mod_params(spec)

    def scores(raw, b, params):
        score_mod = None if spec.score_mod is None else eqx.combine(params, static)
        return replace(spec, score_mod=score_mod).scores(raw, q_idx, kv_idx, b)

    s, scores_vjp = jax.vjp(scores, logits(q, k), bias, params)
    lse = lse[..., None]
    if visible is None:
        p = jnp.exp(s - lse)
    else:
        # A hidden pair's logit may exceed the row's log-sum-exp by any amount (and a row that
        # sees nothing has lse = MASKED): exponentiate only visible pairs, so nothing overflows.
        p = jnp.where(visible, jnp.exp(jnp.where(visible, s, lse) - lse), 0.0)
    dp = logits(d_out, v)
    p_dropped = p
    if spec.dropout_p is not None:
        keep = spec.keep(q_idx, kv_idx)
        p_dropped = jnp.where(keep, p / (1 - spec.dropout_p), 0.0)
        dp = jnp.where(keep, dp / (1 - spec.dropout_p), 0.0)
    dv_t = jnp.einsum(
        "kgdq,kgqc->kdc", d_out_t, p_dropped.astype(d_out.dtype), preferred_element_type=jnp.float32
    )
    ds, dbias, dmod = scores_vjp(p * (dp - delta[..., None]))
    dq = jnp.einsum("kgqc,kcd->kgqd", ds, k, preferred_element_type=jnp.float32)
    dk_t = jnp.einsum("kgdq,kgqc->kdc", q_t, ds, preferred_element_type=jnp.float32)
    return dq, dk_t, dv_t, dbias, dmod


def key_grad_accumulators(k: Float[Array, "K bk d"], v: Float[Array, "K bk dv"]):
    """Float32 zeros for a key block's gradients as [`block_backward`][] returns them,
    transposed: `[K, d, bk]` and `[K, dv, bk]`."""
    return tuple(jnp.zeros((x.shape[0], x.shape[2], x.shape[1]), jnp.float32) for x in (k, v))


def score_mod_params(spec: AttentionSpec):
    """`score_mod` split into its floating-point captured arrays and the rest (`eqx.partition`).

    Those arrays are the mod's learnable parameters (ALiBi slopes, a relative-position table):
    the backward pass differentiates the scores with respect to them too.
    """
    return eqx.partition(spec.score_mod, eqx.is_inexact_array)


def split_differentiable(q, k, v, bias, spec: AttentionSpec):
    """`(x, aux)`: the inputs a kernel differentiates (queries, keys, values, bias, sinks and
    `score_mod`'s parameters) and the spec without them. [`join_differentiable`][] inverts it."""
    params, static = score_mod_params(spec)
    return (q, k, v, bias, spec.sinks, params), replace(spec, sinks=None, score_mod=static)


def join_differentiable(x, aux: AttentionSpec):
    """`(q, k, v, bias, spec)` from [`split_differentiable`][]'s `(x, aux)`."""
    q, k, v, bias, sinks, params = x
    score_mod = None if aux.score_mod is None else eqx.combine(params, aux.score_mod)
    return q, k, v, bias, replace(aux, sinks=sinks, score_mod=score_mod)


def zeros_like_params(params):
    """Float32 accumulators for the gradient of `score_mod_params`, summed over blocks."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)


def finalize(
    carry: Carry, sinks: Float[Array, "K G"] | None = None
) -> tuple[Float[Array, "K G bq dv"], Float[Array, "K G bq"]]:
    """Normalised output and log-sum-exp; rows with no visible key give 0 and lse = MASKED.

    `sinks` join the normaliser as one more key with a zero value, folded in last like any
    other key: a row that saw no key then outputs 0 with lse = its sink.
    """
    m, denom, acc = carry
    if sinks is not None:
        sink = jnp.broadcast_to(sinks[..., None], m.shape)
        m_new = jnp.maximum(m, sink)
        m_safe, correction = _shift(m, m_new)
        m, denom = m_new, denom * correction + jnp.exp(sink - m_safe)
        acc = acc * correction[..., None]
    seen = denom > 0
    out = acc / jnp.where(seen, denom, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), MASKED)
    return out, lse


def sink_grad(
    sinks: Float[Array, "K G"], lse: Float[Array, "K G T"], delta: Float[Array, "K G T"]
) -> Float[Array, "K G"]:
    """Gradient of the sink logits: the sink is a key with `dp = 0`, so `ds = -p_sink * delta`.

    A finite sink keeps every row's normaliser positive, so `lse` is a real log-sum-exp; a
    `-inf` sink gives `exp(-inf - lse) = 0` even where a row saw nothing (`lse = MASKED`).
    """
    return -jnp.sum(jnp.exp(sinks[..., None] - lse) * delta, axis=-1)


def spec_cotangent(spec: AttentionSpec, dsinks, dmod) -> AttentionSpec:
    """A custom VJP's cotangent for the spec: the gradients of the sinks and of `score_mod`'s
    parameters (as accumulated in float32), none for its other leaves."""
    # `dmod` has `None` where the mod holds no float array, as a cotangent should.
    params, _ = score_mod_params(spec)
    dmod = None if dmod is None else jax.tree.map(lambda g, x: g.astype(x.dtype), dmod, params)
    empty = jax.tree.map(lambda _: None, spec)
    return replace(empty, sinks=dsinks, score_mod=dmod)
