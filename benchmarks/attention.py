"""Speed and memory of `eqx_attention.dot_product_attention` against its anchors.

Run by hand (never part of the tests):

    .venv/bin/python benchmarks/attention.py                 # speed table, ~10 min on 2 cores
    .venv/bin/python benchmarks/attention.py --memory        # + peak memory at long T
    .venv/bin/python benchmarks/attention.py --memory --long # + T=65536 fwd+bwd (minutes)
    .venv/bin/python benchmarks/attention.py --lengths 8192 --implementations eqx_attention \
        --json benchmarks/results/attention_8192.json        # the causal speed-up further out

Everything is measured in one run on the current machine: the library's default and "xla"
implementations, `jax.nn.dot_product_attention`, and Equinox-style attention (a per-head
einsum + softmax, `jax.vmap`ped over heads as `equinox.nn.MultiheadAttention` does), each
with batch 2 via `jax.vmap`, 8 heads of 64, float32. Each time is the best of `--repeats`
runs, an implementation's causal and non-causal runs taking turns so that the causal
speed-up sees the same machine load. GFLOP/s count the matmuls only:
forward 4·B·H·T²·D, backward twice that, halved for causal attention; the machine's
float32 matmul rate is measured alongside as the ceiling.
"""

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import eqx_attention as ea

RESULTS = pathlib.Path(__file__).parent / "results" / "attention.json"


def equinox_style(q, k, v, causal):
    """Per-head attention as equinox.nn.MultiheadAttention computes it."""

    def one_head(q, k, v):
        logits = (q / math.sqrt(q.shape[-1])) @ k.T
        if causal:
            mask = jnp.tril(jnp.ones(logits.shape, bool))
            logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
        return jax.nn.softmax(logits) @ v

    return jax.vmap(one_head, in_axes=1, out_axes=1)(q, k, v)


def ours(implementation):
    def attend(q, k, v, causal):
        return ea.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)

    return attend


def jax_nn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


IMPLEMENTATIONS = {
    "eqx_attention": ours(None),
    "eqx_attention[xla]": ours("xla"),
    "jax.nn": jax_nn,
    "equinox-style": equinox_style,
}
if jax.default_backend() == "gpu":
    # The default is cuDNN there; show the portable kernel and jax.nn's own cuDNN call too.
    IMPLEMENTATIONS["eqx_attention[chunked]"] = ours("chunked")
    IMPLEMENTATIONS["jax.nn[cudnn]"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"
    )


def make_fns(attend, causal):
    def fwd(q, k, v):
        return jax.vmap(lambda q, k, v: attend(q, k, v, causal))(q, k, v)

    def loss(q, k, v):
        return jnp.sum(fwd(q, k, v) ** 2)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def best_times(fns, *args, repeats):
    """The best wall time of each function of the dict `fns`, running them in turns.

    Taking turns puts every function under the same load, so the ratios between them hold
    even when a shared machine's speed drifts during the run (by 10% or more here).
    """
    for fn in fns.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_time(fn, *args, repeats):
    return best_times({"": fn}, *args, repeats=repeats)[""]


def matmul_gflops(repeats, dtype):
    """The machine's matmul rate in `dtype`: the best of a few square sizes."""
    best = 0.0
    sizes = (1024, 2048) if jax.default_backend() == "cpu" else (4096, 8192)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        t = best_time(jax.jit(jnp.dot), a, a, repeats=repeats)
        best = max(best, 2 * n**3 / t / 1e9)
    return best


def inputs(batch, length, heads, size, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return [jax.random.normal(k, (batch, length, heads, size), dtype) for k in keys]


def speed_table(args):
    rows = []
    dtype = jnp.dtype(args.dtype)
    peak = matmul_gflops(args.repeats, dtype)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, dtype: {dtype.name}")
    print(f"{dtype.name} matmul peak (measured): {peak:.0f} GFLOP/s\n")
    header = (
        f"{'T':>5} {'causal':>6} {'implementation':<20} {'fwd ms':>9} {'fwd+bwd ms':>11} "
        f"{'fwd GF/s':>9} {'f+b GF/s':>9} {'fwd vs jax.nn':>14} {'f+b vs jax.nn':>14}"
    )
    print(header)
    print("-" * len(header))
    for length in args.lengths:
        q, k, v = inputs(args.batch, length, args.heads, args.head_size, dtype)
        seconds = {}
        for name in args.implementations:
            if name == "equinox-style" and length > args.equinox_max_length:
                continue
            fns = {}
            for causal in (False, True):
                fns[name, causal, "fwd"], fns[name, causal, "fwd+bwd"] = make_fns(
                    IMPLEMENTATIONS[name], causal
                )
            # An implementation's causal and non-causal runs take turns (see best_times), but
            # not with other implementations': the materialising ones allocate gigabytes,
            # and freeing and re-faulting that memory would slow down whatever runs next.
            seconds.update(best_times(fns, q, k, v, repeats=args.repeats))
        for causal in (False, True):
            flops = 4 * args.batch * args.heads * length**2 * args.head_size
            flops = flops / 2 if causal else flops
            anchor_fwd = seconds.get(("jax.nn", causal, "fwd"))
            anchor_both = seconds.get(("jax.nn", causal, "fwd+bwd"))
            for name in args.implementations:
                if (name, causal, "fwd") not in seconds:
                    continue
                t_fwd, t_both = seconds[name, causal, "fwd"], seconds[name, causal, "fwd+bwd"]
                rows.append(
                    dict(implementation=name, T=length, causal=causal,
                         fwd_ms=t_fwd * 1e3, fwdbwd_ms=t_both * 1e3)
                )  # fmt: skip
                print(
                    f"{length:>5} {causal!s:>6} {name:<20} {t_fwd * 1e3:>9.1f} "
                    f"{t_both * 1e3:>11.1f} {flops / t_fwd / 1e9:>9.1f} "
                    f"{3 * flops / t_both / 1e9:>9.1f} {_speedup(anchor_fwd, t_fwd)} "
                    f"{_speedup(anchor_both, t_both)}"
                )
        print()
    ours_rows = {(r["T"], r["causal"]): r for r in rows if r["implementation"] == "eqx_attention"}
    if ours_rows:
        print("causal speed-up of the default implementation (non-causal time / causal time):")
    for length in sorted({t for t, _ in ours_rows}):
        plain, causal = ours_rows[(length, False)], ours_rows[(length, True)]
        print(
            f"  T={length}: fwd {plain['fwd_ms'] / causal['fwd_ms']:.2f}x, "
            f"fwd+bwd {plain['fwdbwd_ms'] / causal['fwdbwd_ms']:.2f}x"
        )
    results = pathlib.Path(args.json)
    results.parent.mkdir(exist_ok=True, parents=True)
    meta = dict(backend=jax.default_backend(), device=str(jax.devices()[0]), dtype=dtype.name)
    results.write_text(json.dumps(dict(matmul_gflops=peak, **meta, rows=rows), indent=1))
    print(f"\nwrote {results}")


def _speedup(anchor: float | None, seconds: float) -> str:
    return f"{'-':>14}" if anchor is None else f"{anchor / seconds:>13.2f}x"


def peak_memory_mib() -> float:
    """This process's peak resident memory.

    Read from /proc (VmHWM, reset by exec) rather than `ru_maxrss`, which Linux carries over
    from the parent through fork + exec, so a child would report its parent's peak.
    """
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_child(length, implementation):
    """Run one causal fwd+bwd at batch 1 and print the process's peak resident memory."""
    q, k, v = inputs(1, length, 8, 64)
    _, grad = make_fns(IMPLEMENTATIONS[implementation], causal=True)
    start = time.perf_counter()
    jax.block_until_ready(grad(q, k, v))
    seconds = time.perf_counter() - start
    print(json.dumps(dict(peak_mib=peak_memory_mib(), seconds=seconds)))


def run_memory_child(script, length, name):
    """Run `script --memory-child length name` in a fresh process.

    **Returns:** its `{"peak_mib", "seconds"}` result, or a string saying why it failed.
    """
    out = subprocess.run(
        [sys.executable, script, "--memory-child", str(length), name],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_table(args):
    lengths = [4096, 16384] + ([65536] if args.long else [])
    print("\npeak process memory, causal fwd+bwd, batch 1, 8 heads of 64, float32")
    print("(a separate process per row; logits alone would be 8 heads x T^2 x 4 bytes)")
    for length in lengths:
        for name in ("eqx_attention", "jax.nn"):
            logits_gib = 8 * length**2 * 4 / 2**30
            if name == "jax.nn" and logits_gib > 4:
                print(f"  T={length:>6} {name:<14} skipped: logits alone need {logits_gib:.0f} GiB")
                continue
            result = run_memory_child(__file__, length, name)
            if isinstance(result, str):
                print(f"  T={length:>6} {name:<14} failed: {result}")
                continue
            print(
                f"  T={length:>6} {name:<14} peak {result['peak_mib']:>8.0f} MiB "
                f"(logits would be {logits_gib * 1024:>8.0f} MiB), {result['seconds']:.1f} s"
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument(
        "--implementations", nargs="+", choices=list(IMPLEMENTATIONS),
        default=list(IMPLEMENTATIONS),
        help="what to time (speed-ups against jax.nn need it in the list)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", default=str(RESULTS), help="where to write the rows")
    parser.add_argument(
        "--equinox-max-length", type=int, default=8192,
        help="skip the Equinox-style anchor beyond this length (it materialises every logit)",
    )  # fmt: skip
    parser.add_argument("--memory", action="store_true", help="also measure peak memory")
    parser.add_argument("--long", action="store_true", help="with --memory: include T=65536")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("T", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    if not args.skip_speed:
        speed_table(args)
    if args.memory:
        memory_table(args)


if __name__ == "__main__":
    main()
