"""Block skipping for every mask source: packed documents as segment ids, as a `mask_mod` and
as a dense boolean mask, against the same call with no mask.

Run by hand (never part of the tests), on a quiet machine:

    .venv/bin/python benchmarks/masks.py              # T=8192, 8 documents: ~3 min on 2 cores
    .venv/bin/python benchmarks/masks.py --documents 4

Forward+backward (and forward alone), float32, batch 1 through `jax.vmap`, 4 heads of 64,
T = 8192 cut into equal packed documents, the blockwise kernel. Every variant of one row
group takes turns with its baseline so that the speed-ups see the same machine load.
"""

import argparse

import jax
import jax.numpy as jnp
from attention import best_times, inputs

import eqx_attention as ea


def variants(length: int, documents: int):
    """name -> keyword arguments for `dot_product_attention`, one example's worth."""
    ids = jnp.repeat(jnp.arange(documents), length // documents, total_repeat_length=length)

    def same_document(q_pos, kv_pos):
        return ids[q_pos] == ids[kv_pos]

    dense = ids[:, None] == ids[None, :]
    return {
        "no mask": {},
        "segment ids": dict(query_segment_ids=ids, kv_segment_ids=ids),
        "mask_mod": dict(mask_mod=same_document),
        "dense mask": dict(mask=dense),
        "one document": dict(query_segment_ids=ids * 0, kv_segment_ids=ids * 0),
        "causal": dict(is_causal=True),
        "causal + segment ids": dict(is_causal=True, query_segment_ids=ids, kv_segment_ids=ids),
    }


def make_fns(options):
    def fwd(q, k, v):
        def one(q, k, v):
            return ea.dot_product_attention(q, k, v, implementation="chunked", **options)

        return jax.vmap(one)(q, k, v)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v) ** 2)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    q, k, v = inputs(1, args.length, 4, 64)
    options = variants(args.length, args.documents)
    print(
        f"backend: {jax.default_backend()}, T={args.length}, {args.documents} documents of "
        f"{args.length // args.documents}, batch 1 via vmap, 4 heads of 64, float32, chunked"
    )
    header = (
        f"{'variant':<22} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd speed-up':>13} "
        f"{'f+b speed-up':>13}"
    )
    print(header)
    print("-" * len(header))
    # The last group skips nothing: it is what building and using the plan costs.
    groups = [
        ("no mask", ["segment ids", "mask_mod", "dense mask"]),
        ("causal", ["causal + segment ids"]),
        ("no mask", ["one document"]),
    ]
    for baseline, names in groups:
        fns = {}
        for name in [baseline, *names]:
            fns[name, "fwd"], fns[name, "fwd+bwd"] = make_fns(options[name])
        seconds = best_times(fns, q, k, v, repeats=args.repeats)
        for name in [baseline, *names]:
            fwd, both = seconds[name, "fwd"], seconds[name, "fwd+bwd"]
            speed_fwd = seconds[baseline, "fwd"] / fwd
            speed_both = seconds[baseline, "fwd+bwd"] / both
            print(
                f"{name:<22} {fwd * 1e3:>9.1f} {both * 1e3:>11.1f} {speed_fwd:>12.2f}x "
                f"{speed_both:>12.2f}x"
            )
        print()


if __name__ == "__main__":
    main()
