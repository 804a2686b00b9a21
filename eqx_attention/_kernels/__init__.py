"""Attention implementations behind `dot_product_attention`'s one entry point."""

from typing import Literal

import jax

from .._spec import AttentionSpec
from ._chunked import block_plan as _block_plan, chunked_attention as _blockwise
from ._cudnn import cudnn_attention as cudnn_attention, cudnn_unsupported
from ._decode import decode_attention
from ._pallas import default_blocks, pallas_attention, pallas_unsupported
from ._pallas_decode import pallas_decode_attention
from ._plan import BlockPlan as BlockPlan
from ._xla import xla_attention as xla_attention, xla_probs as xla_probs

Implementation = Literal["xla", "chunked", "cudnn", "pallas"]

# Measured on a 2-core AVX-512 CPU (benchmarks/attention.py): 512 x 512 tiles run about twice
# as fast per logit as 128-wide ones, and one key/value head at a time keeps them in cache.
BLOCK_Q = 512
BLOCK_K = 512
# Finer steps where a causal/window range ends inside a coarse block, so skipping wastes
# less there; ranges that end on the block grid (a causal diagonal) take whole blocks, which
# cost less per logit (benchmarks/tiles.py).
FINE_Q = 256
FINE_K = 256
# The one place in code for the threshold (docs/guides/implementations.md states it for
# users, and tests/test_kernels.py checks that the two agree). Up to this many logits per head
# the one-shot reference beats the blockwise loop on CPU, forward and backward (by 25-30% at
# 192 x 192); at 256 x 256 the two are even, within a few percent either way depending on
# head count and size, and past that the loop is ahead.
XLA_MAX_LOGITS = 192 * 192


# Up to this many queries, a call is a decoding step: one loop over the key blocks that may
# be visible, all heads at once, with 512-key blocks (the fastest read of a cache measured).
# From DECODE_MIN_KV keys on, it beats the one-shot reference even where that would fit
# (which reads the whole buffer, filled or not).
DECODE_MAX_Q = 16
DECODE_MIN_KV = 2048
DECODE_BLOCK_K = 512


def chunked_attention(q, k, v, spec: AttentionSpec, bias, plan: BlockPlan | None = None):
    if spec.q_seq <= DECODE_MAX_Q and plan is None:
        return decode_attention(q, k, v, spec, bias, DECODE_BLOCK_K)
    return _blockwise(q, k, v, spec, bias, plan, (BLOCK_Q, BLOCK_K, FINE_Q, FINE_K))


def blockwise_attention(
    implementation: Implementation, q, k, v, spec: AttentionSpec, bias, plan: BlockPlan | None
):
    """Run one of the implementations on the kernels' `[K, G, T, D]` layout (cuDNN aside):
    `(out, lse)`. A block plan is used by the blockwise and Pallas kernels; without one, a
    call of at most `DECODE_MAX_Q` queries is a decoding step, which `"chunked"` runs as the
    XLA decode loop and `"pallas"` as the split-K decode kernel."""
    if implementation == "xla":
        return xla_attention(q, k, v, spec, bias)
    if implementation == "pallas" and spec.q_seq <= DECODE_MAX_Q and plan is None:
        return pallas_decode_attention(q, k, v, spec, bias)
    if implementation == "pallas":
        return pallas_attention(q, k, v, spec, bias, plan)
    return chunked_attention(q, k, v, spec, bias, plan)


def block_plan(spec: AttentionSpec, block_size: tuple[int, int] | None = None) -> BlockPlan:
    """The plan for `spec` on `block_size` blocks, by default the tiles of the kernel the
    automatic rule runs on this platform (the Pallas kernel's on a GPU)."""
    if block_size is not None:
        return _block_plan(spec, block_size * 2, fit=False)
    if jax.default_backend() == "gpu":
        return _block_plan(spec, default_blocks(spec.q_seq, spec.kv_seq) * 2, fit=False)
    # The blockwise kernel's tiles, cut to the sequences where they are shorter.
    return _block_plan(spec, (BLOCK_Q, BLOCK_K) * 2)


def choose_implementation(
    spec: AttentionSpec, dtype, implementation: Implementation | None, qk_size: int, vo_size: int
) -> Implementation:
    """Resolve `implementation=None` and check that cuDNN can run an explicit `"cudnn"`.

    The automatic rule tries the backends in order, each saying why it cannot run a call:
    cuDNN on a GPU whenever it supports the configuration; the Pallas kernel on a GPU for
    everything else; off a GPU, the materialising `"xla"` reference for small problems (at
    most `XLA_MAX_LOGITS` logits per head), where one fused softmax beats a loop, unless the
    call is a decoding step over a long buffer; otherwise the blockwise `"chunked"` kernel.
    """
    why_not_cudnn = cudnn_unsupported(spec, dtype, qk_size, vo_size)
    if implementation == "cudnn" and why_not_cudnn is not None:
        raise ValueError(f"implementation='cudnn' is unavailable: {why_not_cudnn}")
    if implementation is not None:
        return implementation
    if why_not_cudnn is None:
        return "cudnn"
    decoding = spec.q_seq <= DECODE_MAX_Q
    if pallas_unsupported(spec, decoding) is None:
        return "pallas"
    long_decoding = decoding and spec.kv_seq >= DECODE_MIN_KV
    if spec.q_seq * spec.kv_seq <= XLA_MAX_LOGITS and not long_decoding:
        return "xla"
    return "chunked"
