"""Decoding speed: a cached `MultiheadAttention` step against the machine's read bandwidth.

Run by hand (never part of the tests), on a quiet machine:

    .venv/bin/python benchmarks/decode.py        # about 3 minutes on 2 cores

`MultiheadAttention(8, 1024)`, a batch of 4 caches through `jax.vmap`, float32, each step
jitted with the caches donated (so they are updated in place). Prints:

1. the read bandwidth (the best `jnp.sum` over a 1 GiB array);
2. ms per step for several buffer sizes and fillings, with the step's share of the read
   roofline: (bytes of the filled keys and values + the weights) / time / bandwidth;
3. tokens/s against context length, for this library, for `flax.nnx.MultiHeadAttention`
   decoding (whose cache is a `[max_length]` buffer read whole) and for the roofline;
4. prefilling 2048 tokens into an 8192-slot cache against causal self-attention over them.
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from attention import best_time, best_times

import eqx_attention as ea

BATCH, HEADS, FEATURES = 4, 8, 1024
BYTES = 4  # float32


def read_bandwidth(repeats: int) -> float:
    """Bytes per second that `jnp.sum` reads from a 1 GiB array."""
    x = jnp.ones((2**28,), jnp.float32)
    return x.nbytes / best_time(jax.jit(jnp.sum), x, repeats=repeats)


def module():
    return ea.MultiheadAttention(HEADS, FEATURES, key=jax.random.key(0))


def weight_bytes(mha) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(mha, eqx.is_array)))


@eqx.filter_jit(donate="all-except-first")
def _step(mha, caches, x):
    return jax.vmap(lambda c, x: mha(x, cache=c))(caches, x)


def filled_caches(mha, max_length: int, filled: int):
    """A batch of caches holding `filled` random tokens (written directly, not decoded)."""

    def one(key):
        cache = mha.init_cache(max_length)
        keys, values = jax.random.normal(key, (2,) + cache.keys.shape)
        return ea.KVCache(keys, values, jnp.int32(filled))

    return jax.vmap(one)(jax.random.split(jax.random.key(1), BATCH))


def step_seconds(mha, max_length: int, filled: int, repeats: int) -> float:
    """Best time of one decoding step, feeding each step's output to the next."""
    caches = filled_caches(mha, max_length, filled)
    x = jnp.ones((BATCH, 1, FEATURES))
    best = float("inf")
    for i in range(repeats + 1):
        # Each step writes one token: start again from `filled` so the length stays put.
        caches = eqx.tree_at(lambda c: c.length, caches, jnp.full((BATCH,), filled))
        jax.block_until_ready(caches)
        t = time.perf_counter()
        x, caches = _step(mha, caches, x)
        jax.block_until_ready(x)
        if i:  # the first call compiles
            best = min(best, time.perf_counter() - t)
    return best


def flax_step_seconds(max_length: int, repeats: int) -> float:
    """`flax.nnx.MultiHeadAttention` decoding one token with a `max_length` cache."""
    from flax import nnx

    mha = nnx.MultiHeadAttention(HEADS, FEATURES, decode=True, rngs=nnx.Rngs(0), deterministic=True)
    mha.init_cache((BATCH, max_length, FEATURES))
    mha.cache_index.value = jnp.int32(max_length // 2)

    @nnx.jit
    def step(mha, x):
        mha.cache_index.value = jnp.int32(max_length // 2)  # stay inside the buffer
        return mha(x)

    return best_time(lambda x: step(mha, x), jnp.ones((BATCH, 1, FEATURES)), repeats=repeats)


def prefill_table(mha, repeats: int):
    """Writing a 2048-token prompt into empty 8192-slot caches (made beforehand, as a
    decoding program makes them once, and donated) against causal self-attention."""
    x = jax.random.normal(jax.random.key(2), (BATCH, 2048, FEATURES))

    @eqx.filter_jit(donate="all-except-first")
    def prefill(kept, caches):
        mha, x = kept
        return jax.vmap(lambda c, x: mha(x, cache=c))(caches, x)[0]

    @eqx.filter_jit
    def causal(mha, x):
        return jax.vmap(lambda x: mha(x, is_causal=True))(x)

    def empty():
        return jax.vmap(lambda _: mha.init_cache(8192))(jnp.arange(BATCH))

    fns = {
        "prefill": lambda x: prefill((mha, x), empty()),
        "causal": lambda x: causal(mha, x),
        "empty caches": lambda x: empty(),
    }
    seconds = best_times(fns, x, repeats=repeats)
    prefill_only = seconds["prefill"] - seconds["empty caches"]
    print(
        f"\nprefill 2048 tokens into 8192 slots: {prefill_only * 1e3:.1f} ms (making the "
        f"empty caches, {seconds['empty caches'] * 1e3:.1f} ms, not counted); causal "
        f"self-attention over 2048: {seconds['causal'] * 1e3:.1f} ms; ratio "
        f"{prefill_only / seconds['causal']:.2f}x"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    bandwidth = read_bandwidth(args.repeats)
    mha = module()
    weights = weight_bytes(mha)
    print(
        f"backend: {jax.default_backend()}, MultiheadAttention({HEADS}, {FEATURES}), batch "
        f"{BATCH} via vmap, float32; read bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    header = f"{'max_length':>10} {'filled':>6} {'ms/step':>8} {'GB/s':>6} {'roofline':>8}"
    print(header)
    print("-" * len(header))
    steps = {}
    for max_length, filled in ((1024, 1000), (8192, 1000), (8192, 8000), (32768, 1000),
                               (32768, 32000)):  # fmt: skip
        seconds = step_seconds(mha, max_length, filled, args.repeats)
        steps[max_length, filled] = seconds
        moved = BATCH * 2 * HEADS * filled * (FEATURES // HEADS) * BYTES + weights
        print(
            f"{max_length:>10} {filled:>6} {seconds * 1e3:>8.2f} {moved / seconds / 1e9:>6.1f} "
            f"{100 * moved / seconds / bandwidth:>7.0f}%"
        )
    part = steps[32768, 1000] / steps[32768, 32000]
    print(f"1000 of 32768 slots filled: {100 * part:.0f}% of the full step")

    print("\ntokens/s (batch 4) against context length, a 32768-slot buffer")
    header = f"{'context':>7} {'eqx_attention':>13} {'flax.nnx':>9} {'roofline':>9}"
    print(header)
    print("-" * len(header))
    flax_seconds = flax_step_seconds(32768, args.repeats)
    for context in (1000, 4000, 16000, 32000):
        seconds = steps.get((32768, context)) or step_seconds(mha, 32768, context, args.repeats)
        moved = BATCH * 2 * HEADS * context * (FEATURES // HEADS) * BYTES + weights
        print(
            f"{context:>7} {BATCH / seconds:>13.0f} {BATCH / flax_seconds:>9.0f} "
            f"{BATCH * bandwidth / moved:>9.0f}"
        )
    prefill_table(mha, args.repeats)


if __name__ == "__main__":
    main()
