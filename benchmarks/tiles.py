"""Cost per logit of one forward tile of the blockwise kernel, by tile shape.

Run by hand (never part of the tests):

    .venv/bin/python benchmarks/tiles.py

The `"chunked"` kernel's block sizes (`eqx_attention/_kernels/__init__.py`) come from this
table: a tile is one online-softmax step (`block_forward`) of `rows` queries against `cols`
keys, for one key/value head, batch 2 via `jax.vmap`, head size 64, float32, run `STEPS`
times in a `fori_loop` as the kernel runs it. Small tiles cost more per logit on CPU
because XLA does not spread a small matmul over the cores.
"""

import argparse

import jax
import jax.numpy as jnp
from attention import best_time

from eqx_attention._kernels._blocks import block_forward, init_carry
from eqx_attention._spec import AttentionSpec

STEPS = 32
SHAPES = ((512, 512), (512, 256), (256, 512), (256, 256), (128, 512), (128, 128))


def spec(length: int, causal: bool) -> AttentionSpec:
    return AttentionSpec(
        q_seq=length, kv_seq=length, num_heads=1, num_kv_heads=1, scale=0.125,
        is_causal=causal, window=None, logit_softcap=None, dropout_p=None, mask_mod=None,
        score_mod=None, mask=None, q_length=None, kv_length=None, q_segment_ids=None,
        kv_segment_ids=None, dropout_seed=None,
    )  # fmt: skip


def tile_loop(rows: int, cols: int, masked: bool):
    """`STEPS` tiles on the causal diagonal (masked) or with no mask at all."""
    s = spec(rows + cols, masked)
    q_idx = cols + jnp.arange(rows)  # the last `rows` queries: the diagonal crosses the tile

    def one_example(q, k, v):
        def step(j, carry):
            start = (j % 2) * (rows // 2)
            kv_idx = start + jnp.arange(cols)
            k_blk = jax.lax.dynamic_slice_in_dim(k, start, cols, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, start, cols, axis=1)
            visible = s.visible(q_idx, kv_idx, None) if masked else None
            return block_forward(carry, q, k_blk, v_blk, s, q_idx, kv_idx, None, visible)

        return jax.lax.fori_loop(0, STEPS, step, init_carry(q, 64))[2]

    return jax.jit(jax.vmap(one_example))


def tile_inputs(rows: int, cols: int):
    """Batch-2 queries for one tile, and keys/values long enough for `tile_loop`'s steps."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, 1, 1, rows, 64))
    k, v = (jax.random.normal(key, (2, 1, rows + cols, 64)) for key in keys[1:])
    return q, k, v


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'tile':>9} {'mask':>6} {'us/tile':>8} {'ns/logit':>9}")
    for rows, cols in SHAPES:
        q, k, v = tile_inputs(rows, cols)
        for masked in (False, True):
            seconds = best_time(tile_loop(rows, cols, masked), q, k, v, repeats=args.repeats)
            per_tile = seconds / STEPS
            label = f"{rows}x{cols}"
            print(
                f"{label:>9} {'causal' if masked else 'none':>6} {per_tile * 1e6:8.0f} "
                f"{per_tile / (2 * rows * cols) * 1e9:9.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
