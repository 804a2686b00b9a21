"""Forward mode and second order through the blockwise kernel: `jvp` against the forward
pass, Hessian-vector products against forward+backward, and `jvp`'s peak memory.

Run by hand (never part of the tests), on a quiet machine:

    .venv/bin/python benchmarks/derivatives.py                  # T=2048 and 16384: ~4 min
    .venv/bin/python benchmarks/derivatives.py --lengths 2048   # the short row only

Causal, float32, batch 2 through `jax.vmap`, 8 heads of 64, the blockwise kernel. `jvp`
pushes a tangent of the queries, keys and values at once. The HVP is the Hessian of
`sum(out**2)` times the same tangents, as JAX's autodiff cookbook computes it:
`jax.jvp(jax.grad(f), x, v)[1]`, forward over reverse. "grad+HVP" keeps both outputs of
that `jvp`, the gradient too. Each derivative takes turns with its anchor, so the ratios
see the same machine load. The memory row runs `jvp` at batch 1 in a fresh process
and reads its peak resident memory (the logits alone would be 8 x T^2 x 4 bytes).
"""

import argparse
import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from attention import best_times, inputs, peak_memory_mib

import eqx_attention as ea


def functions(causal: bool):
    def forward(q, k, v):
        def one(q, k, v):
            return ea.dot_product_attention(q, k, v, is_causal=causal, implementation="chunked")

        return jax.vmap(one)(q, k, v)

    def loss(q, k, v):
        return jnp.sum(forward(q, k, v) ** 2)

    grad = jax.grad(loss, argnums=(0, 1, 2))

    def jvp(q, k, v):
        return jax.jvp(forward, (q, k, v), (v, q, k))

    def grad_and_hvp(q, k, v):
        return jax.jvp(grad, (q, k, v), (v, q, k))

    def hvp(q, k, v):
        return grad_and_hvp(q, k, v)[1]

    fns = dict(forward=forward, grad=grad, jvp=jvp, hvp=hvp, grad_and_hvp=grad_and_hvp)
    return {name: jax.jit(fn) for name, fn in fns.items()}


def speed_rows(lengths, repeats):
    print(f"causal, batch 2, 8 heads of 64, float32; best of {repeats} (2 past T=4096)")
    names = ("forward", "jvp", "jvp/fwd", "fwd+bwd", "HVP", "HVP/(f+b)", "grad+HVP", "ratio")
    print(f"{'T':>6} " + " ".join(f"{name:>9}" for name in names))
    for length in lengths:
        q, k, v = inputs(2, length, 8, 64)
        fns = functions(causal=True)
        t = best_times(fns, q, k, v, repeats=repeats if length <= 4096 else 2)
        print(
            f"{length:>6} {t['forward'] * 1e3:>7.0f}ms {t['jvp'] * 1e3:>7.0f}ms "
            f"{t['jvp'] / t['forward']:>7.2f}x {t['grad'] * 1e3:>7.0f}ms {t['hvp'] * 1e3:>7.0f}ms "
            f"{t['hvp'] / t['grad']:>9.2f}x {t['grad_and_hvp'] * 1e3:>7.0f}ms "
            f"{t['grad_and_hvp'] / t['grad']:>8.2f}x"
        )


def memory_child(length: int):
    q, k, v = inputs(1, length, 8, 64)
    jvp = functions(causal=True)["jvp"]
    start = time.perf_counter()
    jax.block_until_ready(jvp(q, k, v))
    print(json.dumps(dict(peak_mib=peak_memory_mib(), seconds=time.perf_counter() - start)))


def memory_row(length: int):
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(length)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    logits_mib = 8 * length**2 * 4 / 2**20
    print(
        f"jvp, causal, batch 1, T={length}: peak {result['peak_mib']:.0f} MiB of process memory "
        f"(the logits would be {logits_mib:.0f} MiB), {result['seconds']:.1f} s"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-length", type=int, default=16384)
    parser.add_argument("--memory-child", type=int)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child)
        return
    speed_rows(args.lengths, args.repeats)
    memory_row(args.memory_length)


if __name__ == "__main__":
    main()
