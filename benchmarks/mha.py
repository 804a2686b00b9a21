"""Speed and memory of `eqx_attention.MultiheadAttention` against Equinox's and Flax's modules.

Run by hand (never part of the tests):

    .venv/bin/python benchmarks/mha.py           # full run, ~10-15 min on 2 cores
    .venv/bin/python benchmarks/mha.py --quick   # smoke run, ~1 min

Everything is measured in one run on the current machine, float32, 512 features, 8 heads
(of 64), batch 4:

1. Training-shaped calls: `eqx_attention.MultiheadAttention` and
   `equinox.nn.MultiheadAttention` `jax.vmap`ped over the batch under `eqx.filter_jit`;
   `flax.nnx.MultiHeadAttention` on the batch directly (its native form), jitted through
   `nnx.split`/`nnx.merge`. Forward, and forward+backward (gradient of a scalar loss with
   respect to the parameters). Causal attention is an explicit mask for Equinox,
   `is_causal=True` for the others.
2. Decoding throughput after 1024 tokens of context: one new token per example per jitted
   step, with this module's `KVCache`, with flax nnx's `decode=True` cache, and by
   recomputing the full causal pass over the last 1024 tokens without a cache.
3. Peak memory of a causal forward at long T, one subprocess per row; Equinox is not run
   where its logits alone would exceed `--memory-budget-gib`.
"""

import argparse
import json
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from attention import (  # the sibling script: one timing and memory rule for every table
    best_time,
    peak_memory_mib,
    run_memory_child,
)
from flax import nnx

import eqx_attention as ea

FEATURES, HEADS, BATCH = 512, 8, 4


def modules():
    ours = ea.MultiheadAttention(HEADS, FEATURES, key=jax.random.key(0))
    theirs = eqx.nn.MultiheadAttention(HEADS, FEATURES, key=jax.random.key(0))
    flax = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=FEATURES, use_bias=False, decode=False, rngs=nnx.Rngs(0)
    )
    return ours, theirs, flax


def forward_fns(causal: bool):
    """`name -> (params, apply(params, x))` for the three modules, batch via vmap/native."""
    ours, theirs, flax = modules()

    def apply_ours(m, x):
        return jax.vmap(lambda e: m(e, is_causal=causal))(x)

    def apply_equinox(m, x):
        mask = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool)) if causal else None
        return jax.vmap(lambda e: m(e, e, e, mask))(x)

    graphdef, state = nnx.split(flax)

    def apply_flax(state, x):
        return nnx.merge(graphdef, state)(x, is_causal=causal)

    return {
        "eqx_attention": (ours, apply_ours),
        "equinox": (theirs, apply_equinox),
        "flax.nnx": (state, apply_flax),
    }


def _loss(apply):
    return lambda params, x: jnp.sum(apply(params, x) ** 2)


def speed_table(args):
    print(f"backend: {jax.default_backend()}, {jax.device_count()} device(s)")
    print(
        f"\n1. forward / forward+backward, batch {BATCH} (vmap), {FEATURES} features, "
        f"{HEADS} heads, float32, eqx.filter_jit; best of {args.repeats}"
    )
    header = (
        f"{'T':>5} {'causal':>6} {'module':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'fwd vs equinox':>15} {'f+b vs equinox':>15}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for length in args.lengths:
        x = jax.random.normal(jax.random.key(1), (BATCH, length, FEATURES))
        for causal in args.causal:
            measured = {}
            for name, (params, apply) in forward_fns(causal).items():
                fwd = eqx.filter_jit(apply)
                grad = eqx.filter_jit(eqx.filter_grad(_loss(apply)))
                measured[name] = (
                    best_time(fwd, params, x, repeats=args.repeats),
                    best_time(grad, params, x, repeats=args.repeats),
                )
            anchor_fwd, anchor_both = measured["equinox"]
            for name, (t_fwd, t_both) in measured.items():
                rows.append(dict(T=length, causal=causal, module=name, fwd=t_fwd, both=t_both))
                print(
                    f"{length:>5} {causal!s:>6} {name:<14} {t_fwd * 1e3:>9.1f} "
                    f"{t_both * 1e3:>11.1f} {anchor_fwd / t_fwd:>14.2f}x "
                    f"{anchor_both / t_both:>14.2f}x"
                )
        print()
    return rows


def decode_table(args):
    context, steps = args.context, args.steps
    max_length = context + steps
    ours, _, flax = modules()
    flax_decode = nnx.MultiHeadAttention(
        num_heads=HEADS, in_features=FEATURES, use_bias=False, decode=True, rngs=nnx.Rngs(0)
    )
    prompt = jax.random.normal(jax.random.key(2), (BATCH, context, FEATURES))

    # This module: prefill once, then one token per step.
    @eqx.filter_jit
    def ours_step(m, x, cache):
        return jax.vmap(lambda x, c: m(x, cache=c))(x, cache)

    cache = jax.vmap(lambda _: ours.init_cache(max_length))(jnp.arange(BATCH))
    out, cache = ours_step(ours, prompt, cache)
    token = out[:, -1:]

    def run_ours():
        tok, c = token, cache
        for _ in range(steps):
            tok, c = ours_step(ours, tok, c)
        return tok

    # flax nnx: decode=True takes one token per call, so the context is fed token by token.
    flax_decode.init_cache((BATCH, max_length, FEATURES))
    graphdef, state = nnx.split(flax_decode)

    @jax.jit
    def flax_step(state, x):
        m = nnx.merge(graphdef, state)
        y = m(x)
        return y, nnx.split(m)[1]

    for t in range(context):
        y, state = flax_step(state, prompt[:, t : t + 1])
    flax_token, flax_state = y, state

    def run_flax():
        tok, s = flax_token, flax_state
        for _ in range(steps):
            tok, s = flax_step(s, tok)
        return tok

    # No cache: the full causal pass over the last `context` tokens for every new token.
    @eqx.filter_jit
    def recompute(m, window):
        return jax.vmap(lambda e: m(e, is_causal=True)[-1:])(window)

    def run_recompute():
        window = prompt
        for _ in range(steps):
            tok = recompute(ours, window)
            window = jnp.concatenate([window[:, 1:], tok], axis=1)
        return window

    print(
        f"2. decoding after {context} tokens of context, batch {BATCH}, {steps} steps of one "
        f"token, best of {args.repeats}"
    )
    header = f"{'method':<28} {'ms/step':>9} {'tokens/s':>10} {'vs flax.nnx':>12}"
    print(header)
    print("-" * len(header))
    results = {}
    for name, run in (
        ("eqx_attention KVCache", run_ours),
        ("flax.nnx decode=True", run_flax),
        ("eqx_attention, no cache", run_recompute),
    ):
        results[name] = best_time(run, repeats=args.repeats) / steps
    anchor = results["flax.nnx decode=True"]
    for name, per_step in results.items():
        print(
            f"{name:<28} {per_step * 1e3:>9.2f} {BATCH / per_step:>10.0f} "
            f"{anchor / per_step:>11.2f}x"
        )
    print()
    return results


def memory_child(length, name):
    """One causal forward at batch BATCH; print the process's peak resident memory."""
    params, apply = forward_fns(causal=True)[name]
    x = jax.random.normal(jax.random.key(1), (BATCH, length, FEATURES))
    fn = eqx.filter_jit(apply)
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak_mib=peak_memory_mib(), seconds=seconds)))


def memory_table(args):
    print(
        f"3. peak process memory, causal forward, batch {BATCH}, {HEADS} heads, float32 "
        "(a subprocess per row, compile time included)"
    )
    for length in args.memory_lengths:
        # Logits of every example and head, float32, as a materialising module holds them.
        logits_gib = BATCH * HEADS * length**2 * 4 / 2**30
        for name in ("eqx_attention", "equinox", "flax.nnx"):
            if name != "eqx_attention" and logits_gib > args.memory_budget_gib:
                print(
                    f"  T={length:>6} {name:<14} not run: its logits alone need "
                    f"{logits_gib:.0f} GiB (budget {args.memory_budget_gib} GiB)"
                )
                continue
            result = run_memory_child(__file__, length, name)
            if isinstance(result, str):
                print(f"  T={length:>6} {name:<14} failed: {result}")
                continue
            print(
                f"  T={length:>6} {name:<14} peak {result['peak_mib']:>8.0f} MiB, "
                f"{result['seconds']:.1f} s (logits would be {logits_gib:.1f} GiB)"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--memory-budget-gib", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true", help="skip section 1")
    parser.add_argument("--memory-child", nargs=2, metavar=("T", "MODULE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    if args.quick:
        args.lengths, args.context, args.steps = [256], 128, 4
        args.memory_lengths, args.repeats = [1024], 1
    args.causal = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    if not args.skip_speed:
        speed_table(args)
    decode_table(args)
    memory_table(args)


if __name__ == "__main__":
    main()
