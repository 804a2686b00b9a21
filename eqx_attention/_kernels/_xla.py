"""The readable reference: materialise the logits, softmax, multiply by V."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._spec import AttentionSpec
from ._blocks import MASKED, raw_logits


def xla_logits(
    q: Float[Array, "K G T D"], k: Float[Array, "K S D"], spec: AttentionSpec, bias
) -> Float[Array, "K G T _"]:
    """Scores with every hidden pair set to `MASKED`, and the sinks as one more column.

    The sink column is a key with a zero value that every query sees: it joins the softmax
    and its log-sum-exp, and is dropped from the probabilities afterwards.
    """
    q_idx = jnp.arange(spec.q_seq)
    kv_idx = jnp.arange(spec.kv_seq)
    s = spec.scores(raw_logits(q, k), q_idx, kv_idx, bias)
    visible = spec.visible(q_idx, kv_idx, spec.mask)
    if visible is not None:
        s = jnp.where(visible, s, MASKED)
    if spec.sinks is None:
        return s
    sink = jnp.broadcast_to(spec.sinks[:, :, None, None], s.shape[:-1] + (1,))
    return jnp.concatenate([s, sink], axis=-1)


def xla_probs(
    q: Float[Array, "K G T D"], k: Float[Array, "K S D"], spec: AttentionSpec, bias
) -> Float[Array, "K G T S"]:
    """Attention probabilities (before dropout); rows with no visible key are all zero.

    With sinks, a row's probabilities sum to less than one: the sink takes the rest.
    """
    return _softmax(xla_logits(q, k, spec, bias))[..., : spec.kv_seq]


def _shift(s: Float[Array, "*rows S"]) -> Float[Array, "*rows 1"]:
    # The row maximum, or 0 for a row with no visible key (all MASKED), whose exp is then
    # exactly zero instead of one.
    m = jnp.max(s, axis=-1, keepdims=True)
    return jnp.where(m > MASKED, m, 0.0)


@jax.custom_jvp
def _softmax(s: Float[Array, "*rows S"]) -> Float[Array, "*rows S"]:
    """Softmax over the last axis in which a row of only `MASKED` gives zeros."""
    p = jnp.exp(s - _shift(s))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def _logsumexp(s: Float[Array, "*rows S"]) -> Float[Array, "*rows"]:
    """Log-sum-exp of each row; `MASKED` for a row with no visible key."""
    m = _shift(s)
    denom = jnp.sum(jnp.exp(s - m), axis=-1, keepdims=True)
    lse = jnp.where(denom > 0, m + jnp.log(jnp.where(denom > 0, denom, 1.0)), MASKED)
    return lse[..., 0]


@_softmax.defjvp
def _softmax_jvp(primals, tangents):
    # The closed form p * (ds - <p, ds>) replaces differentiating through the max, exp and
    # division: one fused pass instead of several, which makes the backward pass ~1.5x faster
    # on CPU. Masked entries have p = 0 (and a zero tangent), so they stay out of it.
    (s,), (ds,) = primals, tangents
    p = _softmax(s)
    return p, p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))


def xla_attention(
    q: Float[Array, "K G T D"],
    k: Float[Array, "K S D"],
    v: Float[Array, "K S Dv"],
    spec: AttentionSpec,
    bias,
    lse_gradient: bool = False,
) -> tuple[Float[Array, "K G T Dv"], Float[Array, "K G T"]]:
    """The output and each row's log-sum-exp, which carries no gradient (as in jax.nn) unless
    `lse_gradient` (for kernels that differentiate through this reference)."""
    s = xla_logits(q, k, spec, bias)
    p = _softmax(s)[..., : spec.kv_seq]
    if spec.dropout_p is not None:
        keep = spec.keep(jnp.arange(spec.q_seq), jnp.arange(spec.kv_seq))
        p = jnp.where(keep, p / (1 - spec.dropout_p), 0.0)
    out = jnp.einsum("kgqc,kcd->kgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    lse = _logsumexp(s)
    return out, lse if lse_gradient else jax.lax.stop_gradient(lse)
