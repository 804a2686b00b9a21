"""Per-example boolean mask builders, all returning `[q_seq, kv_seq]` (True = may attend)."""

from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Bool, Shaped


def make_causal_mask(q_len: int, kv_len: int | None = None) -> Bool[Array, "q_len kv_len"]:
    """Causal mask, bottom-right aligned like [`eqx_attention.dot_product_attention`][].

    **Arguments:**

    - `q_len`: number of queries.
    - `kv_len`: number of keys; defaults to `q_len`. With `q_len < kv_len` the queries are the
      last `q_len` positions, so query `i` sees keys `0..kv_len - q_len + i`.

    **Returns:**

    Boolean array of shape `(q_len, kv_len)`.
    """
    kv_len = q_len if kv_len is None else kv_len
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    return jnp.arange(kv_len)[None, :] <= q_pos


def make_attention_mask(
    query_input: Shaped[Array, " q_len"],
    key_input: Shaped[Array, " kv_len"],
    pairwise_fn: Callable[[Array, Array], Array] = jnp.multiply,
) -> Bool[Array, "q_len kv_len"]:
    """Pairwise mask from per-position values, as `flax.nnx.make_attention_mask` (unbatched).

    **Arguments:**

    - `query_input`: one value per query, e.g. a padding indicator.
    - `key_input`: one value per key.
    - `pairwise_fn`: combines the two; the default `jnp.multiply` gives "both non-zero".
      `jnp.equal` on segment ids gives a packed-document mask.

    **Returns:**

    Boolean array of shape `(q_len, kv_len)`: `pairwise_fn(query_input[:, None],
    key_input[None, :])` cast to bool.
    """
    return pairwise_fn(query_input[:, None], key_input[None, :]).astype(bool)


def combine_masks(*masks: Bool[Array, "..."] | None) -> Bool[Array, "..."] | None:
    """Logical and of broadcastable masks, skipping `None`s.

    **Returns:**

    The combined boolean mask, or `None` when every argument is `None`.
    """
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0].astype(bool)
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def cross_attention_mask(
    mask_q: Shaped[Array, " q_len"], mask_kv: Shaped[Array, " kv_len"]
) -> Bool[Array, "q_len kv_len"]:
    """Mask for cross-attention between two padded sequences.

    **Arguments:**

    - `mask_q`: `True` (or non-zero) at real query positions.
    - `mask_kv`: `True` (or non-zero) at real key/value positions.

    **Returns:**

    Boolean array `(q_len, kv_len)`, `True` where both positions are real. A padded query
    row is all `False`, which attention turns into a zero output row.
    """
    return make_attention_mask(mask_q.astype(bool), mask_kv.astype(bool), jnp.logical_and)
