"""Per-device memory and time of ring attention over 1, 2, 4 and 8 devices.

Run by hand; prints a Markdown table. On a CPU it simulates the devices
(`--xla_force_host_platform_device_count=8`, set below before JAX starts), so they share the
host's cores: time does not fall with more devices there, but per-device memory does.

    python benchmarks/ring.py --seq 8192 --causal

Memory is XLA's own per-device accounting of the compiled SPMD program
(`jit(...).lower(...).compile().memory_analysis()`): arguments + outputs + temporaries of
one device, an upper bound on its peak (CPU devices report no `memory_stats()`); the
temporaries, in brackets, are the logit tiles, the visiting slice and accumulators. On
GPUs `memory_stats()["peak_bytes_in_use"]` is printed too.
"""

import argparse
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import eqx_attention  # noqa: E402

MiB = 2**20


def build(num_devices: int, causal: bool, layout: str):
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("seq",))

    def attend(q, k, v):
        return eqx_attention.ring_attention(
            q, k, v, axis_name="seq", is_causal=causal, layout=layout
        )

    ring = jax.shard_map(attend, mesh=mesh, in_specs=P("seq"), out_specs=P("seq"))
    forward = jax.jit(ring)

    @jax.jit
    def forward_backward(q, k, v):
        out, vjp = jax.vjp(ring, q, k, v)
        return vjp(out)  # any cotangent of the right shape will do

    return mesh, forward, forward_backward


def measure(fn, args, repeats: int):
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis()
    io = (mem.argument_size_in_bytes + mem.output_size_in_bytes) / MiB
    temp = mem.temp_size_in_bytes / MiB
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), io + temp, temp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192, help="total sequence length")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [
        (args.seq, args.heads, args.dim),
        (args.seq, args.kv_heads, args.dim),
        (args.seq, args.kv_heads, args.dim),
    ]
    inputs = [
        jax.random.normal(key, shape, jnp.float32) for key, shape in zip(keys, shapes, strict=True)
    ]
    layouts = ["contiguous", "zigzag"] if args.causal else ["contiguous"]

    print(
        f"ring attention, seq={args.seq}, heads={args.heads}/{args.kv_heads}, dim={args.dim}, "
        f"causal={args.causal}, float32, {jax.devices()[0].device_kind}"
    )
    print()
    print(
        "| devices | layout | fwd ms | fwd+bwd ms | fwd MiB/device (temp) "
        "| fwd+bwd MiB/device (temp) |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.devices:
        for layout in layouts:
            mesh, forward, forward_backward = build(n, args.causal, layout)
            # Random inputs: the zig-zag reordering would not change the work, so skip it.
            sharded = jax.device_put(inputs, NamedSharding(mesh, P("seq")))
            fwd_ms, fwd_mib, fwd_temp = measure(forward, sharded, args.repeats)
            bwd_ms, bwd_mib, bwd_temp = measure(forward_backward, sharded, args.repeats)
            print(
                f"| {n} | {layout} | {fwd_ms:.1f} | {bwd_ms:.1f} | {fwd_mib:.1f} ({fwd_temp:.1f}) "
                f"| {bwd_mib:.1f} ({bwd_temp:.1f}) |"
            )
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        print(f"\ndevice 0 peak_bytes_in_use: {stats['peak_bytes_in_use'] / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
