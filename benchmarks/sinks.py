"""What learned attention sinks cost the blockwise kernel: forward and forward+backward time
with and without `sinks`, taking turns so that both see the same machine load.

Run by hand (never part of the tests), on a quiet machine:

    .venv/bin/python benchmarks/sinks.py                 # T=2048 and 4096, ~2 min on 2 cores
    .venv/bin/python benchmarks/sinks.py --lengths 8192

Batch 2 via `jax.vmap`, 8 heads of 64, float32, `implementation="chunked"`, causal and not.
The backward pass with sinks also returns their gradient.
"""

import argparse

import jax
import jax.numpy as jnp
from attention import best_times, inputs

import eqx_attention as ea


def make_fns(causal: bool, with_sinks: bool):
    def fwd(q, k, v, sinks):
        def one(q, k, v):
            return ea.dot_product_attention(
                q, k, v, is_causal=causal, sinks=sinks if with_sinks else None,
                implementation="chunked",
            )  # fmt: skip

        return jax.vmap(one)(q, k, v)

    def loss(q, k, v, sinks):
        return jnp.sum(fwd(q, k, v, sinks) ** 2)

    argnums = (0, 1, 2, 3) if with_sinks else (0, 1, 2)
    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=argnums))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    heads = 8
    print(f"backend: {jax.default_backend()}, batch 2, {heads} heads of 64, float32, chunked")
    header = f"{'T':>5} {'causal':>6} {'pass':<8} {'no sinks ms':>12} {'sinks ms':>9} {'extra':>7}"
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        q, k, v = inputs(2, length, heads, 64)
        sinks = jax.random.normal(jax.random.key(1), (heads,))
        for causal in (False, True):
            fns = {}
            for with_sinks in (False, True):
                fwd, grad = make_fns(causal, with_sinks)
                fns["fwd", with_sinks], fns["fwd+bwd", with_sinks] = fwd, grad
            seconds = best_times(fns, q, k, v, sinks, repeats=args.repeats)
            for name in ("fwd", "fwd+bwd"):
                plain, sunk = seconds[name, False], seconds[name, True]
                print(
                    f"{length:>5} {causal!s:>6} {name:<8} {plain * 1e3:>12.1f} "
                    f"{sunk * 1e3:>9.1f} {100 * (sunk / plain - 1):>+6.1f}%"
                )


if __name__ == "__main__":
    main()
