"""Per-example boolean mask builders, all returning `[q_seq, kv_seq]` (True = may attend), and
ready-made `mask_mod`s."""

import functools
from collections.abc import Callable

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, Shaped

from ._spec import MaskMod, query_positions


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
    return jnp.arange(kv_len)[None, :] <= query_positions(q_len, kv_len)[:, None]


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


# Ready-made `mask_mod`s. Each returns an elementwise function of key-axis positions (a query
# row i sits at position kv_seq - q_seq + i), for `dot_product_attention(mask_mod=...)`; like
# every mask source, the blocks they hide are skipped, and arrays they hold may be traced
# (e.g. `vmap`ped per example).


def document_mask_mod(segment_ids: Int[Array, " kv_seq"]) -> MaskMod:
    """Packed documents: a query attends only to keys of its own document.

    **Arguments:**

    - `segment_ids`: the document of each key position, `(kv_seq,)`; queries take the ids
      of their positions. The same as `query_segment_ids`/`kv_segment_ids`, as a mod that
      can be combined with others.

    **Returns:**

    `mask_mod(q_pos, kv_pos)`, defined on the positions `0..len(segment_ids) - 1`: a call
    whose queries or (visible) keys sit further on raises a `ValueError` naming both lengths,
    rather than reading the last id for them (with a cache, give the ids of every slot).
    """

    def mask_mod(q_pos, kv_pos):
        return segment_ids[q_pos] == segment_ids[kv_pos]

    return _defined_on(mask_mod, segment_ids.shape[0])


def prefix_lm_mask_mod(prefix_length: int | Int[Array, ""]) -> MaskMod:
    """Prefix language model: every query sees the whole prefix, and is causal after it.

    **Arguments:**

    - `prefix_length`: the number of prefix (prompt) positions; an int, or an int array
      (so a batch of prefixes can be `vmap`ped).

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """
    return lambda q_pos, kv_pos: (kv_pos <= q_pos) | (kv_pos < prefix_length)


def chunked_mask_mod(chunk_size: int) -> MaskMod:
    """Chunked local attention, as in Llama 4: causal within chunks of `chunk_size`
    positions, nothing across them.

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got chunk_size={chunk_size}")
    return lambda q_pos, kv_pos: (q_pos // chunk_size == kv_pos // chunk_size) & (kv_pos <= q_pos)


def global_tokens_mask_mod(num_global: int | Int[Array, ""]) -> MaskMod:
    """Global tokens: the first `num_global` positions see every key and every query sees them.

    Combined with a window through [`eqx_attention.or_mask_mods`][] this is
    Longformer-style attention, and with `is_causal=True` the "attention sink" tokens of
    StreamingLLM.

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """
    return lambda q_pos, kv_pos: (kv_pos < num_global) | (q_pos < num_global)


def sliding_window_mask_mod(left: int, right: int = 0) -> MaskMod:
    """A query at position `p` sees keys in `[p - left, p + right]`: `local_window_size` as a
    mod, to combine with others (`local_window_size` itself skips blocks by structure alone).

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """
    return lambda q_pos, kv_pos: (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)


def and_mask_mods(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when every one of `mask_mods` allows it.

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """

    def mask_mod(q_pos, kv_pos):
        return functools.reduce(jnp.logical_and, [mod(q_pos, kv_pos) for mod in mask_mods])

    return _defined_on(mask_mod, *(_num_positions(mod) for mod in mask_mods))


def or_mask_mods(*mask_mods: MaskMod) -> MaskMod:
    """A pair is visible when any one of `mask_mods` allows it.

    **Returns:**

    `mask_mod(q_pos, kv_pos)`.
    """

    def mask_mod(q_pos, kv_pos):
        return functools.reduce(jnp.logical_or, [mod(q_pos, kv_pos) for mod in mask_mods])

    return _defined_on(mask_mod, *(_num_positions(mod) for mod in mask_mods))


def _num_positions(mod: MaskMod) -> int | None:
    return getattr(mod, "num_positions", None)


def _defined_on(mod: MaskMod, *num_positions: int | None) -> MaskMod:
    """`mod`, marked as defined on the positions `0..n - 1` only, for the smallest given `n`.

    `dot_product_attention` (through `as_data`) reads `num_positions` and refuses a call
    whose positions run past it, where indexing would clamp silently.
    """
    known = [n for n in num_positions if n is not None]
    if known:
        mod.num_positions = min(known)  # pyright: ignore[reportFunctionMemberAccess]
    return mod
