"""Key/value caches for autoregressive decoding: explicit pytrees, passed in and returned.

Both caches describe their contents the same way: every slot holds the key and value of one
absolute token position (or is empty, position `-1`). Attention over a cache is then plain
causal (and windowed) attention on absolute positions, whatever the layout of the slots, so
a linear buffer and a ring buffer share one masking rule.

The protocol attention relies on, so that it never asks which cache it holds:

- `length`: the number of tokens written so far (the position of the next one);
- `check_call(mask, bias, window)`: raise a `ValueError` for call options the cache cannot
  serve;
- `update(keys, values) -> (keys, values, positions, cache)`: write the new tokens and
  return what the new queries attend to, with each slot's absolute position.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, DTypeLike, Float, Int

from ._spec import Window

EMPTY = -1


class KVCache(eqx.Module):
    """Keys and values of the tokens seen so far, for one example, in a buffer of fixed size.

    Slot `p` holds token position `p`; `length` tokens have been written. Create one with
    [`eqx_attention.MultiheadAttention.init_cache`][] and thread it through calls:
    `out, cache = mha(x, cache=cache)`. The shapes never change, so a jitted decoding step
    compiles once; writing past `max_length` raises an error (through `eqx.error_if`)
    rather than silently overwriting or clamping.

    For a batch, `jax.vmap` over caches created by `jax.vmap(lambda _: mha.init_cache(n))(
    jnp.arange(batch))`; every example keeps its own `length`.
    """

    keys: Float[Array, "max_length num_kv_heads qk_size"]
    values: Float[Array, "max_length num_kv_heads vo_size"]
    length: Int[Array, ""]

    @classmethod
    def empty(
        cls, max_length: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype: DTypeLike
    ) -> "KVCache":
        """An empty cache of `max_length` slots."""
        return cls(*_empty("max_length", max_length, num_kv_heads, qk_size, vo_size, dtype))

    @property
    def max_length(self) -> int:
        return self.keys.shape[0]

    def check_call(self, mask: Array | None, bias: Array | None, window: Window | None):
        """Every mask, bias and window works on a linear buffer: nothing to refuse."""
        del mask, bias, window

    def update(
        self,
        keys: Float[Array, "new num_kv_heads qk_size"],
        values: Float[Array, "new num_kv_heads vo_size"],
    ) -> tuple[
        Float[Array, "slots num_kv_heads qk_size"],
        Float[Array, "slots num_kv_heads vo_size"],
        Int[Array, " slots"],
        "KVCache",
    ]:
        """Append `new` tokens at positions `length, ..., length + new - 1`.

        **Returns:**

        `(keys, values, positions, cache)`: the keys and values the new queries attend to
        (the whole buffer, new tokens included), the absolute position held by each of those
        slots (`-1` for an empty slot) and the updated cache.
        """
        new = keys.shape[0]
        if new > self.max_length:
            raise ValueError(
                f"cannot write {new} tokens into a KVCache of max_length={self.max_length}"
            )
        end = self.length + new
        start = eqx.error_if(
            self.length,
            end > self.max_length,
            "KVCache overflow: writing past max_length; create the cache with a larger max_length",
        )
        all_keys = jax.lax.dynamic_update_slice_in_dim(
            self.keys, keys.astype(self.keys.dtype), start, axis=0
        )
        all_values = jax.lax.dynamic_update_slice_in_dim(
            self.values, values.astype(self.values.dtype), start, axis=0
        )
        slots = jnp.arange(self.max_length, dtype=jnp.int32)
        positions = jnp.where(slots < end, slots, EMPTY)
        return all_keys, all_values, positions, KVCache(all_keys, all_values, end)


class SlidingWindowKVCache(eqx.Module):
    """A ring buffer of the last `window` tokens, for sliding-window (local) attention.

    Its memory is the window, not the sequence: a model whose queries see at most `window`
    earlier tokens (`local_window_size=window`, or `(window, 0)`) can decode for ever. Token
    position `p` lives in slot `p % window`. Create one with
    [`eqx_attention.MultiheadAttention.init_sliding_window_cache`][].
    """

    keys: Float[Array, "window num_kv_heads qk_size"]
    values: Float[Array, "window num_kv_heads vo_size"]
    length: Int[Array, ""]

    @classmethod
    def empty(
        cls, window: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype: DTypeLike
    ) -> "SlidingWindowKVCache":
        """An empty ring buffer of `window` slots."""
        return cls(*_empty("window", window, num_kv_heads, qk_size, vo_size, dtype))

    @property
    def window(self) -> int:
        return self.keys.shape[0]

    def check_call(self, mask: Array | None, bias: Array | None, window: Window | None):
        """The ring holds only the last `window` tokens: calls must not look further back,
        and have no dense mask or bias (whose columns would follow the ring's slots)."""
        if window is None or window[0] > self.window:
            raise ValueError(
                f"a SlidingWindowKVCache of window={self.window} needs local_window_size with "
                f"a left window <= {self.window}, got local_window_size={window}"
            )
        if mask is not None or bias is not None:
            raise ValueError("mask and bias are not supported with a SlidingWindowKVCache")

    def update(
        self,
        keys: Float[Array, "new num_kv_heads qk_size"],
        values: Float[Array, "new num_kv_heads vo_size"],
    ) -> tuple[
        Float[Array, "slots num_kv_heads qk_size"],
        Float[Array, "slots num_kv_heads vo_size"],
        Int[Array, " slots"],
        "SlidingWindowKVCache",
    ]:
        """Append `new` tokens at positions `length, ..., length + new - 1`.

        **Returns:**

        `(keys, values, positions, cache)`: the ring buffer *before* the write followed by
        the new tokens (`window + new` slots, so a multi-token chunk sees itself and the
        `window` tokens before it), the absolute position of each slot (`-1` if empty) and
        the updated cache.
        """
        new, window = keys.shape[0], self.window
        keys = keys.astype(self.keys.dtype)
        values = values.astype(self.values.dtype)
        slots = jnp.arange(window, dtype=jnp.int32)
        # The latest position p < length with p % window == slot.
        held = self.length - 1 - jnp.mod(self.length - 1 - slots, window)
        positions = jnp.concatenate(
            [jnp.where(held >= 0, held, EMPTY), self.length + jnp.arange(new, dtype=jnp.int32)]
        )
        all_keys = jnp.concatenate([self.keys, keys])
        all_values = jnp.concatenate([self.values, values])
        # Only the last `window` new tokens survive; writing more would scatter several
        # tokens to one slot, in unspecified order.
        kept = min(new, window)
        write = jnp.mod(self.length + new - kept + jnp.arange(kept, dtype=jnp.int32), window)
        cache = SlidingWindowKVCache(
            self.keys.at[write].set(keys[new - kept :], unique_indices=True),
            self.values.at[write].set(values[new - kept :], unique_indices=True),
            self.length + new,
        )
        return all_keys, all_values, positions, cache


Cache = KVCache | SlidingWindowKVCache


def _empty(name: str, slots: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype):
    """Zeroed keys and values of `slots` slots, and a length of zero."""
    if slots <= 0:
        raise ValueError(f"{name} must be positive, got {name}={slots}")
    return (
        jnp.zeros((slots, num_kv_heads, qk_size), dtype),
        jnp.zeros((slots, num_kv_heads, vo_size), dtype),
        jnp.zeros((), jnp.int32),
    )


def cache_mask(
    query_positions: Int[Array, " q_seq"],
    key_positions: Int[Array, " slots"],
    window: Window | None,
) -> Bool[Array, "q_seq slots"]:
    """Causal (and windowed) visibility on absolute positions; empty slots are hidden."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    visible = (k != EMPTY) & (k <= q)
    if window is not None:
        visible = visible & (k >= q - window[0])
    return visible
