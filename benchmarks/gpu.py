"""The library on one GPU, beside cuDNN and (when importable) PyTorch SDPA and FlexAttention.

Run by hand on a GPU machine (never part of the tests); about 5 minutes on one H200,
compiles included:

    python benchmarks/gpu.py                  # the table, on stdout
    python benchmarks/gpu.py --json out.json  # and every row as JSON
    python benchmarks/gpu.py --smoke          # tiny sizes, any machine: checks the script runs

Batch 4, 16 heads of 128, bfloat16, forward and forward+backward. Each row gives milliseconds
(median of `--repeats` timed calls after a warm-up) and TFLOP/s counted on the logits that are
visible (4·B·H·D per visible (query, key) pair forward, 2.5 times that forward+backward), beside
the device's bf16 matmul rate measured in the same run. Rows:

- dense attention, causal and not, at T = 4096 and 16384: the automatic path, the Pallas
  kernel, `jax.nn` cuDNN, PyTorch SDPA;
- 8 packed documents at T = 8192: segment ids, `document_mask_mod`, causal + segments: the
  Pallas kernel, cuDNN with the equivalent dense mask, FlexAttention with a block mask;
- causal + softcap 30, causal + sinks, ALiBi as a `score_mod` (T = 8192): the Pallas kernel,
  FlexAttention where it has the feature, cuDNN causal without the feature;
- the time to build a block plan for 8 documents, against the forward+backward it serves, and
  the time to compile one forward+backward;
- the decoding rows of `benchmarks/gpu_decode.py`.
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import eqx_attention as ea

BATCH, HEADS, SIZE = 4, 16, 128
BUDGET_S = 330  # stop starting new rows past this, so the whole run stays under 6 minutes


def timed(fn, *args, repeats: int) -> float:
    """Median milliseconds of `fn(*args)` (already compiled by a first call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def torch_timed(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def matmul_peak(n: int, repeats: int) -> float:
    """The device's bf16 matmul rate, TFLOP/s, measured on an n x n x n product."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    return 2 * n**3 / timed(f, a, repeats=repeats) / 1e9


def qkv(T: int, key=0):
    keys = jax.random.split(jax.random.key(key), 3)
    return [jax.random.normal(k, (BATCH, T, HEADS, SIZE), jnp.bfloat16) for k in keys]


def attention_fn(batched_names=(), **kwargs):
    """`(forward, forward+backward)`, jitted: `dot_product_attention` vmapped over the batch;
    the arguments named in `batched_names` are given per example after q, k, v."""

    def forward(q, k, v, *batched):
        def one(q, k, v, *per_example):
            extra = dict(zip(batched_names, per_example, strict=True))
            return ea.dot_product_attention(q, k, v, **extra, **kwargs)

        return jax.vmap(one)(q, k, v, *batched)

    def loss(q, k, v, *batched):
        return jnp.sum(forward(q, k, v, *batched).astype(jnp.float32))

    both = jax.grad(loss, argnums=(0, 1, 2))
    return jax.jit(forward), jax.jit(both)


def cudnn_fn(**kwargs):
    def forward(q, k, v, *mask):
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask[0] if mask else None, implementation="cudnn", **kwargs
        )

    def loss(q, k, v, *mask):
        return jnp.sum(forward(q, k, v, *mask).astype(jnp.float32))

    return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


class Table:
    def __init__(self, peak: float, args):
        self.peak, self.args, self.rows, self.start = peak, args, [], time.perf_counter()

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.start > BUDGET_S

    def add(self, case: str, who: str, pair_count: float, fn_pair, *inputs):
        """Time forward and forward+backward of one implementation on one case: `fn_pair` is
        two jitted JAX functions of `inputs`, or two timers (`torch_pair`)."""
        if self.out_of_time():
            self.rows.append(dict(case=case, who=who, skipped="time budget"))
            return
        flops = 4 * BATCH * HEADS * SIZE * pair_count
        row = dict(case=case, who=who)
        try:
            for name, fn, scale in (("fwd", fn_pair[0], 1.0), ("fwd+bwd", fn_pair[1], 2.5)):
                if isinstance(fn, Timer):
                    ms = fn()
                else:
                    ms = timed(fn, *inputs, repeats=self.args.repeats)
                row[name + "_ms"] = ms
                row[name + "_tflops"] = scale * flops / ms / 1e9
        except Exception as error:  # a row that cannot run says why and the rest go on
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        self.rows.append(row)
        print(format_row(row, self.peak), flush=True)


class Timer:
    """Milliseconds of a PyTorch function, when called."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self) -> float:
        return torch_timed(self.fn, repeats=ARGS.repeats)


def format_row(row, peak) -> str:
    parts = [f"{row['case']:<28} {row['who']:<26}"]
    if "skipped" in row or "error" in row:
        return parts[0] + " " + row.get("skipped", row.get("error", ""))
    for name in ("fwd", "fwd+bwd"):
        if name + "_ms" in row:
            tf = row[name + "_tflops"]
            parts.append(
                f"{name} {row[name + '_ms']:8.2f} ms {tf:6.1f} TF/s ({100 * tf / peak:4.1f}%)"
            )
    return "  ".join(parts)


def torch_pair(make):
    """`(forward, forward+backward)` timers for a PyTorch function, or `None` without torch."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
    except ImportError:
        return None
    fwd, bwd = make(torch)
    return Timer(fwd), Timer(bwd)


def torch_inputs(torch, T, requires_grad=True):
    shape = (BATCH, HEADS, T, SIZE)
    return [
        torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
        for _ in range(3)
    ]


def sdpa(T, causal):
    def make(torch):
        q, k, v = torch_inputs(torch, T)
        F = torch.nn.functional

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def both():
            F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

        return fwd, both

    return torch_pair(make)


def flex(T, doc_lengths=None, causal=False, score_mod_name=None):
    def make(torch):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = torch_inputs(torch, T)
        ids = None
        if doc_lengths is not None:
            ids = torch.as_tensor(
                np.repeat(np.arange(len(doc_lengths)), doc_lengths), device="cuda"
            )

        def mask_mod(b, h, qi, ki):
            ok = qi >= 0
            if causal:
                ok = ok & (qi >= ki)
            if ids is not None:
                ok = ok & (ids[qi] == ids[ki])
            return ok

        block_mask = create_block_mask(mask_mod, None, None, T, T, device="cuda")
        slopes = torch.exp2(-torch.arange(1, HEADS + 1, device="cuda") * 8.0 / HEADS)

        def score_mod(score, b, h, qi, ki):
            if score_mod_name == "softcap":
                return 30.0 * torch.tanh(score / 30.0)
            if score_mod_name == "alibi":
                return score - slopes[h] * (qi - ki).abs()
            return score

        compiled = torch.compile(flex_attention)

        def fwd():
            with torch.no_grad():
                compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)

        def both():
            compiled(q, k, v, score_mod=score_mod, block_mask=block_mask).sum().backward()

        return fwd, both

    return torch_pair(make)


def dense_rows(table: Table, T: int):
    q, k, v = qkv(T)
    for causal in (False, True):
        case = f"dense T={T}" + (" causal" if causal else "")
        pairs = T * (T + 1) / 2 if causal else T * T
        table.add(case, "eqx_attention auto", pairs, attention_fn(is_causal=causal), q, k, v)
        table.add(
            case, "eqx_attention pallas", pairs,
            attention_fn(is_causal=causal, implementation="pallas"), q, k, v,
        )  # fmt: skip
        table.add(case, "jax.nn cudnn", pairs, cudnn_fn(is_causal=causal), q, k, v)
        pair = sdpa(T, causal)
        if pair is not None:
            table.add(case, "torch SDPA", pairs, pair)


def document_rows(table: Table, T: int):
    lengths = np.diff(np.linspace(0, T, 9).astype(int))  # 8 documents
    ids_np = np.repeat(np.arange(8), lengths)
    ids = jnp.broadcast_to(jnp.asarray(ids_np, jnp.int32), (BATCH, T))
    q, k, v = qkv(T)
    square = float(np.sum(lengths.astype(float) ** 2))
    tri = float(np.sum(lengths * (lengths + 1) / 2.0))
    names = ("query_segment_ids", "kv_segment_ids")
    for causal in (False, True):
        case = "8 documents" + (" causal" if causal else "") + f" T={T}"
        pairs = tri if causal else square
        table.add(
            case, "eqx_attention segment ids", pairs,
            attention_fn(names, is_causal=causal, implementation="pallas"), q, k, v, ids, ids,
        )  # fmt: skip
        if not causal:
            mod = ea.document_mask_mod(jnp.asarray(ids_np, jnp.int32))
            table.add(
                case, "eqx_attention mask_mod", pairs,
                attention_fn(mask_mod=mod, implementation="pallas"), q, k, v,
            )  # fmt: skip
        mask = jnp.asarray(ids_np[:, None] == ids_np[None, :])
        if causal:
            mask = mask & jnp.tril(jnp.ones((T, T), bool))
        table.add(case, "jax.nn cudnn dense mask", pairs, cudnn_fn(), q, k, v, mask[None, None])
        pair = flex(T, lengths, causal)
        if pair is not None:
            table.add(case, "torch FlexAttention", pairs, pair)
    # The block plan, built on the GPU, against the forward+backward it serves.
    if not table.out_of_time():
        build = jax.jit(
            jax.vmap(
                lambda ids: ea.make_block_plan(T, T, query_segment_ids=ids, kv_segment_ids=ids)
            )
        )
        ms = timed(build, ids, repeats=ARGS.repeats)
        _, both = attention_fn(names, implementation="pallas")
        total = timed(both, q, k, v, ids, ids, repeats=ARGS.repeats)
        line = (
            f"block plan for 8 documents, T={T}: {ms:.3f} ms = {100 * ms / total:.1f}% of fwd+bwd"
        )
        table.rows.append(dict(case="block plan", ms=ms, share=ms / total))
        print(line, flush=True)


def feature_rows(table: Table, T: int):
    q, k, v = qkv(T)
    pairs = T * (T + 1) / 2
    slopes = jnp.exp2(-jnp.arange(1, HEADS + 1) * 8.0 / HEADS)

    def alibi(s, h, qp, kp):
        return s - slopes[h] * jnp.abs(qp - kp).astype(jnp.float32)

    sinks = jnp.zeros((BATCH, HEADS), jnp.float32)
    cases = [
        ("causal+softcap30", dict(logit_softcap=30.0), "softcap"),
        ("causal+ALiBi score_mod", dict(score_mod=alibi), "alibi"),
    ]
    for name, kwargs, flex_name in cases:
        case = f"{name} T={T}"
        fn = attention_fn(is_causal=True, implementation="pallas", **kwargs)
        table.add(case, "eqx_attention pallas", pairs, fn, q, k, v)
        pair = flex(T, causal=True, score_mod_name=flex_name)
        if pair is not None:
            table.add(case, "torch FlexAttention", pairs, pair)
    case = f"causal+sinks T={T}"
    fn = attention_fn(("sinks",), is_causal=True, implementation="pallas")
    table.add(case, "eqx_attention pallas", pairs, fn, q, k, v, sinks)
    table.add(case, "jax.nn cudnn (no sinks)", pairs, cudnn_fn(is_causal=True), q, k, v)
    # Compiling one forward+backward, from scratch.
    if not table.out_of_time():
        _, both = attention_fn(is_causal=True, logit_softcap=20.0, implementation="pallas")
        start = time.perf_counter()
        both.lower(q, k, v).compile()
        seconds = time.perf_counter() - start
        table.rows.append(dict(case="compile fwd+bwd", seconds=seconds))
        print(f"compiling one forward+backward (causal+softcap): {seconds:.1f} s", flush=True)


def main(argv=None):
    global ARGS, BATCH, HEADS, SIZE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write every row here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any backend")
    parser.add_argument("--no-decode", action="store_true", help="skip the decoding rows")
    ARGS = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if ARGS.smoke:
        BATCH, HEADS, SIZE = 1, 2, 32
        ARGS.repeats = 1
        dense, docs, features = (128,), 128, 128
    else:
        dense, docs, features = (4096, 16384), 8192, 8192
    peak = matmul_peak(256 if ARGS.smoke else 8192, ARGS.repeats)
    print(f"measured bf16 matmul rate: {peak:.1f} TFLOP/s")
    table = Table(peak, ARGS)
    for T in dense:
        dense_rows(table, T)
    document_rows(table, docs)
    feature_rows(table, features)
    if not ARGS.no_decode and not ARGS.smoke and not table.out_of_time():
        try:
            sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
            from gpu_decode import decode_rows

            for line in decode_rows():
                print(line, flush=True)
                table.rows.append(dict(case="decode", line=line))
        except Exception as error:
            print(f"decode rows failed: {type(error).__name__}: {error}", flush=True)
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(
                dict(device=device.device_kind, peak_tflops=peak, rows=table.rows), f, indent=1
            )


ARGS = None

if __name__ == "__main__":
    main()
