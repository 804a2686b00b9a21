"""Key/value caches for autoregressive decoding: explicit pytrees, passed in and returned.

Both caches store keys and values **head-major**, `[num_kv_heads, slots, size]`: a decoding
step reads each head's filled slots as one contiguous run, which is the layout the decode
kernel reads fastest (a slot-major buffer strides over the heads and runs several times
slower on CPU). Attention over a cache is ordinary attention in the position model of
[`eqx_attention.dot_product_attention`][]: the new queries sit at positions `length, ...`
(`query_offset`), and the keys at their slots' positions, so causality, windows, mods and
block skipping need nothing cache-specific.

The protocol attention relies on, so that it never asks which cache it holds:

- `length`: the number of tokens written so far (the position of the next one);
- `check_call(mask, bias, window)`: raise a `ValueError` for call options the cache cannot
  serve;
- `update(keys, values) -> (keys, values, placement, cache)`: write the new tokens (given
  `[new, num_kv_heads, size]`) and return the keys and values the new queries attend to
  (`[slots, num_kv_heads, size]`, a transposed view of the buffer) with `placement`, the
  `dot_product_attention` arguments that place them: `query_offset` and either
  `key_value_seq_length` (the filled slots) or `key_positions`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, Int

from ._spec import Window

EMPTY = -1


class KVCache(eqx.Module):
    """Keys and values of the tokens seen so far, for one example, in a buffer of fixed size.

    Slot `p` holds token position `p`; `length` tokens have been written. The buffers are
    head-major, `keys: (num_kv_heads, max_length, qk_size)` and `values: (num_kv_heads,
    max_length, vo_size)`. Create one with [`eqx_attention.MultiheadAttention.init_cache`][]
    and thread it through calls: `out, cache = mha(x, cache=cache)`. The shapes never change,
    so a jitted decoding step compiles once, and a step reads only the filled slots. Writing
    past `max_length` raises an error (through `eqx.error_if`) rather than silently
    overwriting or clamping.

    For a batch, `jax.vmap` over caches created by `jax.vmap(lambda _: mha.init_cache(n))(
    jnp.arange(batch))`; every example keeps its own `length`. To update the buffers in place
    rather than copy them at every step, donate the cache to the jitted step (see the KV-cache
    guide).
    """

    keys: Float[Array, "num_kv_heads max_length qk_size"]
    values: Float[Array, "num_kv_heads max_length vo_size"]
    length: Int[Array, ""]

    @classmethod
    def empty(
        cls, max_length: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype: DTypeLike
    ) -> "KVCache":
        """An empty cache of `max_length` slots."""
        return cls(*_empty("max_length", max_length, num_kv_heads, qk_size, vo_size, dtype))

    @property
    def max_length(self) -> int:
        return self.keys.shape[1]

    def check_call(self, mask: Array | None, bias: Array | None, window: Window | None):
        """Every mask, bias and window works on a linear buffer: nothing to refuse."""
        del mask, bias, window

    def update(
        self,
        keys: Float[Array, "new num_kv_heads qk_size"],
        values: Float[Array, "new num_kv_heads vo_size"],
    ) -> tuple[
        Float[Array, "max_length num_kv_heads qk_size"],
        Float[Array, "max_length num_kv_heads vo_size"],
        dict[str, Array],
        "KVCache",
    ]:
        """Append `new` tokens at positions `length, ..., length + new - 1`.

        **Returns:**

        `(keys, values, placement, cache)`: the whole buffer, new tokens included, as
        `[max_length, num_kv_heads, size]`; `placement = {"query_offset": length,
        "key_value_seq_length": length + new}`; the updated cache.
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
        all_keys = _write(self.keys, keys, start)
        all_values = _write(self.values, values, start)
        placement = {"query_offset": self.length, "key_value_seq_length": end}
        cache = KVCache(all_keys, all_values, end)
        return _slot_major(all_keys), _slot_major(all_values), placement, cache


class SlidingWindowKVCache(eqx.Module):
    """A ring buffer of the last `window` tokens, for sliding-window (local) attention.

    Its memory is the window, not the sequence: a model whose queries see at most `window`
    earlier tokens (`local_window_size=window`, or `(window, 0)`) can decode for ever. Token
    position `p` lives in slot `p % window`; the buffers are head-major like
    [`eqx_attention.KVCache`][]'s. Create one with
    [`eqx_attention.MultiheadAttention.init_sliding_window_cache`][].
    """

    keys: Float[Array, "num_kv_heads window qk_size"]
    values: Float[Array, "num_kv_heads window vo_size"]
    length: Int[Array, ""]

    @classmethod
    def empty(
        cls, window: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype: DTypeLike
    ) -> "SlidingWindowKVCache":
        """An empty ring buffer of `window` slots."""
        return cls(*_empty("window", window, num_kv_heads, qk_size, vo_size, dtype))

    @property
    def window(self) -> int:
        return self.keys.shape[1]

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
        dict[str, Array],
        "SlidingWindowKVCache",
    ]:
        """Append `new` tokens at positions `length, ..., length + new - 1`.

        **Returns:**

        `(keys, values, placement, cache)`: the ring buffer *before* the write followed by
        the new tokens (`window + new` slots, so a multi-token chunk sees itself and the
        `window` tokens before it); `placement = {"query_offset": length, "key_positions":
        ...}` with the position each slot holds (`-1` if empty); the updated cache.
        """
        new, window = keys.shape[0], self.window
        slots = jnp.arange(window, dtype=jnp.int32)
        # The latest position p < length with p % window == slot.
        held = self.length - 1 - jnp.mod(self.length - 1 - slots, window)
        positions = jnp.concatenate(
            [jnp.where(held >= 0, held, EMPTY), self.length + jnp.arange(new, dtype=jnp.int32)]
        )
        keys = _head_major(keys, self.keys.dtype)
        values = _head_major(values, self.values.dtype)
        all_keys = jnp.concatenate([self.keys, keys], axis=1)
        all_values = jnp.concatenate([self.values, values], axis=1)
        # Only the last `window` new tokens survive; writing more would scatter several
        # tokens to one slot, in unspecified order.
        kept = min(new, window)
        write = jnp.mod(self.length + new - kept + jnp.arange(kept, dtype=jnp.int32), window)
        cache = SlidingWindowKVCache(
            self.keys.at[:, write].set(keys[:, new - kept :], unique_indices=True),
            self.values.at[:, write].set(values[:, new - kept :], unique_indices=True),
            self.length + new,
        )
        placement = {"query_offset": self.length, "key_positions": positions}
        return _slot_major(all_keys), _slot_major(all_values), placement, cache


Cache = KVCache | SlidingWindowKVCache


def _empty(name: str, slots: int, num_kv_heads: int, qk_size: int, vo_size: int, dtype):
    """Zeroed head-major keys and values of `slots` slots, and a length of zero."""
    if slots <= 0:
        raise ValueError(f"{name} must be positive, got {name}={slots}")
    return (
        jnp.zeros((num_kv_heads, slots, qk_size), dtype),
        jnp.zeros((num_kv_heads, slots, vo_size), dtype),
        jnp.zeros((), jnp.int32),
    )


def _head_major(x: Float[Array, "new heads size"], dtype) -> Float[Array, "heads new size"]:
    return jnp.swapaxes(x.astype(dtype), 0, 1)


def _slot_major(x: Float[Array, "heads slots size"]) -> Float[Array, "slots heads size"]:
    # Attention takes slot-major keys and makes them head-major again: XLA cancels the two
    # transposes, so the buffer is read where it lies.
    return jnp.swapaxes(x, 0, 1)


def _write(buffer: Array, new: Float[Array, "new heads size"], start) -> Array:
    """`new` written into the head-major `buffer` from slot `start` on (in place when the
    buffer is donated)."""
    return jax.lax.dynamic_update_slice_in_dim(
        buffer, _head_major(new, buffer.dtype), start, axis=1
    )
