"""Decoding on a GPU: ms per step and the share of the measured read bandwidth.

Run by hand on a GPU (never part of the tests); `benchmarks/gpu.py` prints these rows too:

    .venv/bin/python benchmarks/gpu_decode.py    # under 2 minutes on one H200, compiles included

`MultiheadAttention(32, 4096, num_kv_heads=8)` (head size 128) in bfloat16, caches of
32768 slots, batches of 1 and 32 through `jax.vmap`, 1000, 8000 and 32000 tokens filled.
Prints:

1. the read bandwidth: the best `jnp.sum` over a 2 GiB bfloat16 array;
2. per case, ms per step and its share of that bandwidth, counting the bytes a step must
   read (the filled keys and values, and for the module the weights):
   - `mha step`: the module's decoding step, jitted with the caches donated (as the KV-cache
     guide shows it), one call per step;
   - `mha in scan`: the same step 16 times in one `jax.lax.scan` (no dispatch per step);
   - `attention`: `eqx_attention.dot_product_attention` alone, one query per example at
     offset `n - 1`, `is_causal=True`, over the head-major cache;
   - `jax.nn cudnn`: `jax.nn.dot_product_attention(..., implementation="cudnn")` with
     `key_value_seq_length`, over slot-major copies of the same keys and values;
3. a `SlidingWindowKVCache` of 4096 slots at position 100000 beside a `KVCache` holding
   4096 tokens, batch 32 (a ring buffer's step also copies its window: see `update`).

Nothing heavy happens at import: the arrays are made in `decode_rows`.
"""

import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_attention as ea

HEADS, FEATURES, KV_HEADS = 32, 4096, 8
SIZE = FEATURES // HEADS
SLOTS = 32768
BATCHES = (1, 32)
FILLED = (1000, 8000, 32000)
SCAN_STEPS = 16
# The ring buffer's case: its window, the position it has reached, the batch.
WINDOW, POSITION, WINDOW_BATCH = 4096, 100_000, 32
DTYPE = jnp.bfloat16


def best_time(fn: Callable, *args, repeats: int = 5) -> float:
    """Seconds of the fastest of `repeats` calls of `fn(*args)`, after one to compile."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(time_fn: Callable) -> float:
    """Bytes per second that `jnp.sum` reads from a 2 GiB bfloat16 array."""
    x = jnp.ones((2**30,), DTYPE)
    seconds = time_fn(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x)
    size = x.nbytes
    del x
    return size / seconds


def module():
    mha = ea.MultiheadAttention(HEADS, FEATURES, num_kv_heads=KV_HEADS, key=jax.random.key(0))
    return jax.tree.map(lambda x: x.astype(DTYPE) if eqx.is_inexact_array(x) else x, mha)


def weight_bytes(mha) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(mha, eqx.is_array)))


def cache_bytes(batch: int, tokens: int) -> int:
    """Bytes of the keys and values of `tokens` tokens, for the batch."""
    return 2 * batch * tokens * KV_HEADS * SIZE * jnp.dtype(DTYPE).itemsize


def filled_caches(mha, batch: int, filled: int, slots: int = SLOTS, sliding: bool = False):
    """A batch of caches holding `filled` random tokens (written directly, not decoded)."""

    def one(key):
        cache = mha.init_sliding_window_cache(slots) if sliding else mha.init_cache(slots)
        keys, values = jax.random.normal(key, (2,) + cache.keys.shape, DTYPE)
        return type(cache)(keys, values, jnp.int32(filled))

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), batch))


def _attend(inputs, caches):
    """One decoding step of the batch: `inputs = (mha, x, window)`, which are not donated."""
    mha, x, window = inputs

    def one(cache, x):
        return mha(x, cache=cache, local_window_size=window)

    return jax.vmap(one)(caches, x)


_step = eqx.filter_jit(_attend, donate="all-except-first")


@eqx.filter_jit(donate="all-except-first")
def _scan(inputs, caches):
    mha, xs, window = inputs

    def body(caches, x):
        out, caches = _attend((mha, x, window), caches)
        return caches, out

    return jax.lax.scan(body, caches, xs)


def time_steps(mha, caches, x, window=None, steps: int = 8):
    """Seconds per donated step (best of three runs of `steps`), and the caches after."""
    inputs = (mha, x, window)
    out, caches = _step(inputs, caches)
    jax.block_until_ready((out, caches))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(steps):
            out, caches = _step(inputs, caches)
        jax.block_until_ready((out, caches))
        best = min(best, (time.perf_counter() - start) / steps)
    return best, caches


def time_scan(mha, caches, x, window=None):
    """Seconds per step of `SCAN_STEPS` steps in one `lax.scan` (best of two), and the
    caches after."""
    inputs = (mha, jnp.broadcast_to(x, (SCAN_STEPS,) + x.shape), window)
    caches, out = _scan(inputs, caches)
    jax.block_until_ready((out, caches))
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        caches, out = _scan(inputs, caches)
        jax.block_until_ready((out, caches))
        best = min(best, (time.perf_counter() - start) / SCAN_STEPS)
    return best, caches


@jax.jit
def _functional(q, keys, values, lengths):
    """One query per example at position `n - 1` over the head-major caches."""

    def one(q, k, v, n):
        k, v = jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)
        return ea.dot_product_attention(
            q, k, v, is_causal=True, query_offset=n - 1, key_value_seq_length=n
        )

    return jax.vmap(one)(q, keys, values, lengths)


@jax.jit
def _cudnn(q, k, v, lengths):
    return jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def _row(name: str, batch: int, filled, seconds: float, read: int, bandwidth: float) -> str:
    share = read / seconds / bandwidth
    numbers = f"{seconds * 1e3:>9.3f} {read / 1e9:>8.3f} {share:>7.0%}"
    return f"{name:<22} {batch:>5} {filled!s:>8} {numbers}"


def decode_rows(time_fn: Callable | None = None) -> list[str]:
    """The table's lines: bandwidth, then one line per case. `time_fn(fn, *args)` gives the
    seconds of a call (by default [`best_time`][]); the donated steps are timed here."""
    time_fn = best_time if time_fn is None else time_fn
    if jax.default_backend() != "gpu":
        return [f"decode rows: need a GPU, this is {jax.default_backend()!r}"]
    bandwidth = read_bandwidth(time_fn)
    lines = [
        f"decode: MultiheadAttention({HEADS}, {FEATURES}, num_kv_heads={KV_HEADS}), "
        f"bfloat16, {SLOTS} slots; read bandwidth (jnp.sum) {bandwidth / 1e12:.2f} TB/s",
        f"{'case':<22} {'batch':>5} {'filled':>8} {'ms/step':>9} {'GB read':>8} {'of bw':>7}",
    ]
    mha = module()
    weights = weight_bytes(mha)
    for batch in BATCHES:
        x = jax.random.normal(jax.random.key(2), (batch, 1, FEATURES), DTYPE)
        q = jax.random.normal(jax.random.key(3), (batch, 1, HEADS, SIZE), DTYPE)
        for filled in FILLED:
            caches = filled_caches(mha, batch, filled)
            read = cache_bytes(batch, filled)
            seconds, caches = time_steps(mha, caches, x)
            lines.append(_row("mha step", batch, filled, seconds, read + weights, bandwidth))
            seconds, caches = time_scan(mha, caches, x)
            lines.append(_row("mha in scan", batch, filled, seconds, read + weights, bandwidth))
            lengths = jnp.full((batch,), filled, jnp.int32)
            seconds = time_fn(_functional, q, caches.keys, caches.values, lengths)
            lines.append(_row("attention", batch, filled, seconds, read, bandwidth))
            # cuDNN reads slot-major keys and values: copies of the same contents.
            k = jnp.swapaxes(caches.keys, 1, 2)
            v = jnp.swapaxes(caches.values, 1, 2)
            del caches
            try:
                seconds = time_fn(_cudnn, q, k, v, lengths)
                lines.append(_row("jax.nn cudnn", batch, filled, seconds, read, bandwidth))
            except Exception as error:
                lines.append(f"{'jax.nn cudnn':<22} {batch:>5} {filled:>8} failed: {error!s:.60}")
            del k, v
    batch, window = WINDOW_BATCH, (WINDOW, 0)
    x = jax.random.normal(jax.random.key(2), (batch, 1, FEATURES), DTYPE)
    read = cache_bytes(batch, WINDOW) + weights
    linear = filled_caches(mha, batch, WINDOW)
    seconds, _ = time_steps(mha, linear, x, window)
    lines.append(_row("KVCache, window", batch, WINDOW, seconds, read, bandwidth))
    del linear
    ring = filled_caches(mha, batch, POSITION, slots=WINDOW, sliding=True)
    seconds, _ = time_steps(mha, ring, x, window)
    lines.append(_row("SlidingWindowKVCache", batch, POSITION, seconds, read, bandwidth))
    return lines


if __name__ == "__main__":
    for line in decode_rows():
        print(line)
