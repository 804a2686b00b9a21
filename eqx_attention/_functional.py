"""`dot_product_attention` and `dot_product_attention_weights`: per-example pure functions."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Inexact, Int, PRNGKeyArray

from ._kernels import (
    BlockPlan,
    Implementation,
    block_plan,
    blockwise_attention,
    choose_implementation,
    cudnn_attention,
    xla_probs,
)
from ._kernels._plan import check_plan_matches, record_masking
from ._spec import AttentionSpec, MaskMod, ScoreMod, as_data, check_mod_positions
from ._typing import ArrayOrNumPy
from ._vma import vma

# A `(kv_seq,)` array is a key-padding mask (or a per-key bias) shared by every query.
BiasArray = (
    Float[ArrayOrNumPy, "#num_heads #q_seq #kv_seq"]
    | Float[ArrayOrNumPy, "#q_seq #kv_seq"]
    | Float[ArrayOrNumPy, "#kv_seq"]
)
MaskArray = (
    Bool[ArrayOrNumPy, "#num_heads #q_seq #kv_seq"]
    | Bool[ArrayOrNumPy, "#q_seq #kv_seq"]
    | Bool[ArrayOrNumPy, "#kv_seq"]
)
Length = int | np.integer | Int[ArrayOrNumPy, ""]
# An array rate can be changed (with `eqx.tree_at`, or traced) without recompiling.
DropoutRate = float | int | Float[Array, ""]
Output = Float[Array, "q_seq num_heads vo_size"]
Residual = Float[Array, "q_seq num_heads"]


def dot_product_attention(
    query: Inexact[ArrayOrNumPy, "q_seq num_heads qk_size"],
    key: Inexact[ArrayOrNumPy, "kv_seq num_kv_heads qk_size"],
    value: Inexact[ArrayOrNumPy, "kv_seq num_kv_heads vo_size"],
    bias: BiasArray | None = None,
    mask: MaskArray | None = None,
    *,
    scale: float | int | None = None,
    is_causal: bool = False,
    query_seq_length: Length | None = None,
    key_value_seq_length: Length | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[ArrayOrNumPy, " q_seq"] | None = None,
    kv_segment_ids: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    query_offset: Length | None = None,
    key_positions: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    logit_softcap: float | int | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: Float[ArrayOrNumPy, " num_heads"] | None = None,
    dropout_p: DropoutRate = 0.0,
    dropout_key: PRNGKeyArray | None = None,
    implementation: Implementation | None = None,
    return_residual: bool = False,
    block_plan: BlockPlan | None = None,
) -> Output | tuple[Output, Residual]:
    r"""Scaled dot-product attention of one example,
    $\mathrm{softmax}(\mathrm{mask}(s \cdot QK^\top + b))V$.

    Call it on a single example and `jax.vmap` over a batch. Grouped-query (GQA) and
    multi-query (MQA) attention happen when `num_kv_heads` divides `num_heads`: query head
    `n` uses key/value head `n // (num_heads // num_kv_heads)`; the key/value heads are never
    repeated in memory.

    **Arguments:**

    - `query`: `(q_seq, num_heads, qk_size)`.
    - `key`: `(kv_seq, num_kv_heads, qk_size)`.
    - `value`: `(kv_seq, num_kv_heads, vo_size)`; `vo_size` may differ from `qk_size`.
    - `bias`: optional float array added to the scaled logits, of shape
      `(num_heads, q_seq, kv_seq)`, `(q_seq, kv_seq)` or `(kv_seq,)`, where any axis may
      be 1 to broadcast (ALiBi, relative position biases, additive masks).
    - `mask`: optional boolean array of the same shapes as `bias`; `False` marks a pair
      that may not attend. A `(kv_seq,)` mask is a key-padding mask.
    - `scale`: logit scale; defaults to `1 / sqrt(qk_size)`.
    - `is_causal`: a query may only attend to keys at or before its own position.
    - `query_seq_length`, `key_value_seq_length`: the number of real (non-padding) query and
      key positions of this example; an int or an int scalar array (so a batch of lengths
      can be `vmap`ped). Padded query rows output zeros. A concrete length outside
      `[0, q_seq]` (`[0, kv_seq]` for keys) raises a `ValueError`; a traced one (under
      `jit` or `vmap`) cannot be checked and is clipped to that range.
    - `local_window_size`: `w` or `(left, right)`: a query at position `p` sees keys in
      `[p - left, p + right]`.
    - `query_segment_ids`, `kv_segment_ids`: int arrays `(q_seq,)` and `(kv_seq,)`; a query
      only attends to keys of the same segment (packed documents). Give both or neither.
    - `query_offset`: the position of the first query (an int or an int scalar array, so it
      may differ per example under `vmap`); query row `i` sits at `query_offset + i`.
      Defaults to `kv_seq - q_seq` (bottom-right alignment, see below).
    - `key_positions`: int `(kv_seq,)`, the position of each key; a negative position marks
      an empty slot, which no query sees (a ring buffer's keys, say). Defaults to
      `0..kv_seq - 1`.
    - `logit_softcap`: `cap * tanh(logits / cap)` on the scaled (and score-modded) logits, as
      in Gemma 2; `bias` is added after the cap, so an additive mask keeps hiding its keys.
    - `mask_mod`: FlexAttention-style `mask_mod(q_pos, kv_pos) -> bool`, elementwise (it is
      traced once on scalar positions and applied to every block); `False` hides a pair.
    - `score_mod`: `score_mod(score, head, q_pos, kv_pos) -> score`, elementwise, applied to
      the scaled logits (e.g. ALiBi: `score - slope[head] * jnp.abs(q_pos - kv_pos)`).
      Both mods may close over arrays: learned ones (ALiBi slopes, a relative-position
      table) get gradients through every implementation, and per-example ones may be
      `vmap`ped. They only ever see real positions, never the kernels' block padding.
      Constants a mod builds itself (NumPy arrays, `jnp.asarray` of them) are treated like
      captured arrays, and a mod returning a constant broadcasts. A ready-made mod holding
      arrays ([`eqx_attention.document_mask_mod`][]) raises a `ValueError` when a call's
      positions run past them (under `jit`, with traced positions, when the call runs).
    - `sinks`: optional learned attention-sink logits, float `(num_heads,)`. Head `h`'s
      sink joins the softmax's normaliser as one more key with logit `sinks[h]` (taken as
      it is: not scaled, biased, score-modded or capped) and a zero value, so a row's
      weights sum to less than one and it can attend "nowhere" (gpt-oss, StreamingLLM).
      Differentiable; not supported by `"cudnn"`.
    - `dropout_p`: dropout probability on the attention weights; kept weights are divided by
      `1 - dropout_p` so the output is unbiased. A Python number or a scalar array; a new
      value of an array rate does not recompile a jitted caller.
    - `dropout_key`: PRNG key, required when `dropout_p > 0`. The dropout mask is a function
      of the key and the (head, query, key) indices only, so it is the same for every
      implementation.
    - `implementation`: `None` (automatic), `"xla"` (materialises the logits; the readable
      reference), `"chunked"` (flash-style blocks in XLA, O(q_seq) memory, skips fully
      masked blocks), `"pallas"` (the Pallas kernel for GPUs: FlashAttention-2 tiling over
      the block plan's lists, every option of this function; decoding steps of at most 16
      queries run a split-K decode kernel; on a CPU it runs in Pallas interpret mode, slow,
      for testing) or `"cudnn"` (GPU, half precision; raises a `ValueError` naming what it
      cannot do). `"xla"`, `"chunked"` and `"pallas"` differentiate in every mode and to
      any order (`grad`, `jvp`, Hessian-vector products, `grad` of `grad`); `"cudnn"` in
      reverse mode only. On a GPU, `None` takes cuDNN where it supports the call and
      `"pallas"` everywhere else; elsewhere it takes `"xla"` for small problems and
      `"chunked"` for the rest (the threshold is in the implementations guide).
    - `block_plan`: a [`eqx_attention.BlockPlan`][] from [`eqx_attention.make_block_plan`][]
      with the same masking arguments, to reuse across layers and steps instead of
      classifying the blocks again in every call. Used by the blockwise and Pallas kernels,
      ignored by the others, and checked against this call's masking whichever runs: a plan
      built for other masking raises a `ValueError` naming the difference (under `jit`,
      where the values are traced, a runtime error when the call runs).
      `make_block_plan` lists what is compared and what is trusted.
    - `return_residual`: also return each row's log-sum-exp of the (masked, scaled, biased)
      logits, as `jax.nn.dot_product_attention(..., return_residual=True)` does. With it,
      attentions over disjoint key sets merge exactly: for outputs `o_i` with log-sum-exps
      `l_i`, `sum_i exp(l_i - l) o_i` with `l = logsumexp_i(l_i)`. With `sinks` the sink's
      term is part of each row's log-sum-exp (so give the sinks to one part only).

    Every source of masking (causal/window structure, the lengths, segment ids, `mask_mod`,
    `mask`) skips the blocks it hides entirely: the blockwise kernel classifies each
    (query block, key block) pair once per call as empty, full or partial, and visits only
    the non-empty ones, also under `jax.vmap`.

    **Positions.** Causality, windows and the mods see every query and key at a position:
    keys at `0..kv_seq - 1` and queries **bottom-right aligned**, query row `i` at
    `kv_seq - q_seq + i`, unless `query_offset` and `key_positions` say otherwise. With
    `q_seq == kv_seq` this is ordinary self-attention; with fewer queries than keys (chunked
    prefill) the queries are the *last* positions. (`jax.nn.dot_product_attention` aligns
    causal masks top-left instead.) A KV cache is `query_offset` = the tokens already
    cached and `key_value_seq_length` = the slots filled after the write: the blocks past
    the filled length and the ones causality hides are skipped like any other. Lengths and
    dense masks refer to key indices (slots), not positions.

    Query, key and value are promoted together to one dtype (a bfloat16 query with float32
    keys and values computes in float32), explicitly, so the function also runs under
    `jax.numpy_dtype_promotion("strict")`. Logits, softmax and accumulation run in float32
    whatever the input dtype; a query row that may attend to no key at all outputs exactly
    zero, with zero gradients. Complex inputs are refused with a `ValueError`. Any array
    argument may also be a NumPy array, as in `jax.nn`: it is converted with `jnp.asarray`
    (so float64 becomes float32 unless 64-bit mode is on) and its shape checked alike.

    **Returns:**

    Array of shape `(q_seq, num_heads, vo_size)` in the promoted dtype of the inputs. With
    `return_residual=True`, the tuple `(output, lse)` where `lse` has shape
    `(q_seq, num_heads)` and the output's dtype (jax.nn's layout, without the batch axis,
    and jax.nn's dtype: computed in float32, then cast) and carries no gradient; a row that
    sees no key has a large negative finite `lse` (about `-2.4e38`; float16's lowest,
    `-65504`, in float16), which weighs it out of a merge as `-inf` would.
    """
    query, key, value, bias, mask = _as_arrays(query, key, value, bias, mask)
    spec, q, k, v, bias4 = _prepare(query, key, value, **spec_arguments(locals()))
    if block_plan is not None:
        # Whichever implementation runs, and whether it uses the plan or not.
        q, query = check_plan_matches(block_plan, spec, (q, query))
    dtype = _input_dtype(query, key, value)
    impl = choose_implementation(spec, dtype, implementation, query.shape[2], value.shape[2])
    if impl == "cudnn":
        cast = (x.astype(dtype) for x in (query, key, value))
        out, lse = cudnn_attention(*cast, bias, mask, spec)
    else:
        out, lse = blockwise_attention(impl, q, k, v, spec, bias4, block_plan)
        # [K, G, T, ...] -> [T, K * G, ...]: query head n is (n // G, n % G).
        num_kv_heads, group, q_seq, vo_size = out.shape
        out = jnp.transpose(out, (2, 0, 1, 3)).reshape(q_seq, num_kv_heads * group, vo_size)
        lse = jnp.transpose(lse, (2, 0, 1)).reshape(q_seq, num_kv_heads * group)
    out = out.astype(dtype)
    if not return_residual:
        return out
    # In the output's dtype, as jax.nn returns it; clipped to its range first, so that an
    # empty row's fill stays finite in float16.
    bound = float(jnp.finfo(dtype).max)
    return out, jnp.clip(lse, -bound, bound).astype(dtype)


def make_block_plan(
    q_seq: int,
    kv_seq: int,
    mask: MaskArray | None = None,
    *,
    is_causal: bool = False,
    query_seq_length: Length | None = None,
    key_value_seq_length: Length | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[ArrayOrNumPy, " q_seq"] | None = None,
    kv_segment_ids: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    query_offset: Length | None = None,
    key_positions: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    mask_mod: MaskMod | None = None,
    block_size: int | tuple[int, int] | None = None,
) -> BlockPlan:
    """Which blocks [`eqx_attention.dot_product_attention`][] visits, built once for reuse.

    Like FlexAttention's `create_block_mask`: every (query block, key block) pair of the
    blockwise kernel is classified as empty (skipped), full (attended without evaluating
    any mask) or partial, from all the masking arguments at once. `dot_product_attention`
    does this itself in every call; build it here to share it between the layers of a model
    (and its forward and backward passes), then pass `block_plan=plan` together with the
    same masking arguments. Builds under `jit` and `vmap` (for a batch of plans), and new
    lengths or document boundaries need no recompilation.

    ```python
    ids = jnp.repeat(jnp.arange(4), 256)  # 4 packed documents of 256 tokens
    plan = eqx_attention.make_block_plan(1024, 1024, query_segment_ids=ids,
                                         kv_segment_ids=ids, is_causal=True)
    q = k = v = jnp.ones((1024, 8, 64))
    out = eqx_attention.dot_product_attention(
        q, k, v, query_segment_ids=ids, kv_segment_ids=ids, is_causal=True, block_plan=plan
    )
    ```

    **Arguments:**

    - `q_seq`, `kv_seq`: the query and key lengths of the calls it is for.
    - `mask`, `is_causal`, `query_seq_length`, `key_value_seq_length`, `local_window_size`,
      `query_segment_ids`, `kv_segment_ids`, `query_offset`, `key_positions`, `mask_mod`: as
      in `dot_product_attention`.
    - `block_size`: the plan's `(block_q, block_k)` (or one size for both): the tiles of the
      kernel that walks it, which takes them from the plan (the sequences are padded to
      whole blocks). The Pallas kernel takes powers of two from 16 to 128. By default, the
      tiles of the kernel the automatic rule runs here: 64 x 64 for the Pallas kernel on a
      GPU; 512 x 512 for the blockwise kernel on a CPU, cut to the sequences where they are
      shorter.

    **Checked on use.** The plan records the masking it was built from, and every call given
    it compares that with its own, whichever implementation runs (also where the plan goes
    unused), raising a `ValueError` that names the first difference:

    - known when tracing, and compared then: `q_seq`, `kv_seq`, `is_causal`,
      `local_window_size`; which of `mask`, the segment ids, `key_positions` and `mask_mod`
      are given, with the mask's shape (its heads as given, whatever the key/value heads);
      and `mask_mod`'s traced program: its operations and the Python numbers in it
      (`prefix_lm_mask_mod(100)` is not `prefix_lm_mask_mod(1000)`);
    - values: `query_seq_length` and `key_value_seq_length` (clipped to the sequence, which
      also stands for a length not given), `query_offset` (the bottom-right alignment when
      not given), and 32-bit digests of the segment ids, `key_positions`, `mask` and each
      array `mask_mod` captures or builds (a scalar one as it is). Concrete on both sides
      (also per example under `vmap`), they are compared at once. Traced on either side
      (inside `jit`, where even a Python int length becomes an array), they are compared
      when the call runs, through `eqx.error_if`: the call fails with a runtime error
      naming the argument.

    Trusted: values are compared as given, not by the mask they make (relabelled segment ids
    differ; a length past the sequence equals the sequence); a digest misses a difference
    with a probability of about `2**-32`; functions inside `mask_mod`'s program (a
    `custom_jvp` rule) compare by name; and what the blocks do not depend on (`bias`,
    `score_mod`, `scale`, dropout, sinks) is not compared. The block sizes are not part of
    the record: the kernel that walks the plan checks its grid.

    **Returns:**

    A [`eqx_attention.BlockPlan`][].
    """
    num_heads = 1 if mask is None or mask.ndim < 3 else mask.shape[0]
    query = jnp.zeros((q_seq, num_heads, 1))
    key = jnp.zeros((kv_seq, 1, 1))
    spec, *_ = _prepare(query, key, key, **spec_arguments(locals()))
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    return record_masking(block_plan(spec, block_size), spec)


def dot_product_attention_weights(
    query: Inexact[ArrayOrNumPy, "q_seq num_heads qk_size"],
    key: Inexact[ArrayOrNumPy, "kv_seq num_kv_heads qk_size"],
    bias: BiasArray | None = None,
    mask: MaskArray | None = None,
    *,
    scale: float | int | None = None,
    is_causal: bool = False,
    query_seq_length: Length | None = None,
    key_value_seq_length: Length | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    query_segment_ids: Int[ArrayOrNumPy, " q_seq"] | None = None,
    kv_segment_ids: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    query_offset: Length | None = None,
    key_positions: Int[ArrayOrNumPy, " kv_seq"] | None = None,
    logit_softcap: float | int | None = None,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    sinks: Float[ArrayOrNumPy, " num_heads"] | None = None,
) -> Float[Array, "num_heads q_seq kv_seq"]:
    """The attention probabilities that [`eqx_attention.dot_product_attention`][] uses.

    Takes the same arguments (without `value` and dropout) and materialises the full
    `(num_heads, q_seq, kv_seq)` array, so it is meant for inspection and plots. Rows that may
    attend to nothing are all zero.

    **Returns:**

    Float32 array of shape `(num_heads, q_seq, kv_seq)`; each visible row sums to one, or,
    with `sinks`, to one minus the sink's share.
    """
    spec, q, k, _, bias4 = _prepare(query, key, key, **spec_arguments(locals()))
    probs = xla_probs(q, k, spec, bias4)
    return probs.reshape(spec.num_heads, spec.q_seq, spec.kv_seq)


def _prepare(
    query,
    key,
    value,
    shards: int = 1,
    *,
    bias=None,
    mask=None,
    scale=None,
    is_causal=False,
    query_seq_length=None,
    key_value_seq_length=None,
    local_window_size=None,
    query_segment_ids=None,
    kv_segment_ids=None,
    query_offset=None,
    key_positions=None,
    logit_softcap=None,
    mask_mod=None,
    score_mod=None,
    sinks=None,
    dropout_p=0.0,
    dropout_key=None,
):
    """Validate the arguments; build the spec and the kernels' `[K, G, T, D]` layout.

    `shards`: the number of devices the sequences are split over (ring attention), whose
    lengths count positions in the whole sequences, not in this device's shard.
    """
    query, key, value, bias, mask = _as_arrays(query, key, value, bias, mask)
    query_segment_ids, kv_segment_ids, key_positions, sinks = _as_arrays(
        query_segment_ids, kv_segment_ids, key_positions, sinks
    )
    q_seq, num_heads, qk_size = query.shape
    kv_seq, num_kv_heads, _ = key.shape
    dtypes = {"query": query.dtype, "key": key.dtype, "value": value.dtype}
    if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes.values()):
        raise ValueError(
            "complex inputs are unsupported: query, key and value must be real floating "
            f"point, got dtypes {', '.join(f'{n}={d}' for n, d in dtypes.items())}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} (query.shape[1]) must be a multiple of "
            f"num_kv_heads={num_kv_heads} (key.shape[1])"
        )
    dropout_rate = _dropout_rate(dropout_p, dropout_key)
    if (query_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError(
            "query_segment_ids and kv_segment_ids must be given together, got "
            f"query_segment_ids={_describe(query_segment_ids)}, "
            f"kv_segment_ids={_describe(kv_segment_ids)}"
        )
    if logit_softcap is not None and logit_softcap <= 0:
        raise ValueError(f"logit_softcap must be positive, got logit_softcap={logit_softcap}")
    window = _window(local_window_size)
    group = num_heads // num_kv_heads
    # The mods are elementwise: scalars stand for the blocks they will be applied to, typed
    # (inside shard_map) as varying like the inputs.
    position, axes = jnp.int32(0), vma(query, key, value)
    spec = AttentionSpec(
        q_seq=q_seq,
        kv_seq=kv_seq,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        scale=float(1.0 / math.sqrt(qk_size) if scale is None else scale),
        is_causal=bool(is_causal),
        window=window,
        logit_softcap=None if logit_softcap is None else float(logit_softcap),
        dropout_p=dropout_rate,
        mask_mod=as_data(mask_mod, "mask_mod", axes, position, position),
        score_mod=as_data(
            score_mod, "score_mod", axes, jnp.float32(0), position, position, position
        ),
        mask=None if mask is None else _split_heads(mask, num_kv_heads, group),
        q_length=_seq_length(query_seq_length, "query_seq_length", "q_seq", shards * q_seq),
        kv_length=_seq_length(
            key_value_seq_length, "key_value_seq_length", "kv_seq", shards * kv_seq
        ),
        q_segment_ids=query_segment_ids,
        kv_segment_ids=kv_segment_ids,
        dropout_seed=None if dropout_rate is None else _seed(dropout_key),
        sinks=None if sinks is None else sinks.astype(jnp.float32).reshape(num_kv_heads, group),
        query_offset=_length(query_offset),
        key_positions=None if key_positions is None else key_positions.astype(jnp.int32),
    )
    spec = check_mod_positions(spec, axes)
    dtype = _compute_dtype(_input_dtype(query, key, value))
    q = query.astype(dtype).reshape(q_seq, num_kv_heads, group, qk_size).transpose(1, 2, 0, 3)
    k = key.astype(dtype).transpose(1, 0, 2)
    v = value.astype(dtype).transpose(1, 0, 2)
    bias4 = None if bias is None else _split_heads(bias.astype(jnp.float32), num_kv_heads, group)
    return spec, q, k, v, bias4


# The arguments that describe one call's attention beyond q/k/v, named as in `_prepare`:
# every entry point takes the ones it supports under these names and passes them on with
# `spec_arguments`, so no entry point spells them out a second time.
SPEC_ARGUMENTS = tuple(
    name
    for name, parameter in inspect.signature(_prepare).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def spec_arguments(arguments: dict) -> dict:
    """The spec's arguments among an entry point's own (its `locals()` on entry)."""
    return {name: arguments[name] for name in SPEC_ARGUMENTS if name in arguments}


def _input_dtype(query, key, value):
    """The one dtype query, key and value promote to, as Flax promotes them together.

    Promoted explicitly on jnp's standard lattice, so that mixed inputs also work under
    `jax.numpy_dtype_promotion("strict")` (whose point is to make such casts explicit).
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(query.dtype, key.dtype, value.dtype)


def _compute_dtype(dtype):
    # XLA:CPU runs half-precision matmuls far slower than float32, so upcast there; on
    # accelerators keep the half inputs and accumulate in float32 inside the kernels.
    if jax.default_backend() == "cpu" or jnp.dtype(dtype).itemsize >= 4:
        with jax.numpy_dtype_promotion("standard"):
            return jnp.promote_types(dtype, jnp.float32)
    return dtype


def _dropout_rate(dropout_p, dropout_key) -> Float[Array, ""] | None:
    """The rate as a float32 scalar array, or `None` for no dropout.

    A concrete rate is checked here and a zero one switches dropout off statically. A traced
    rate cannot be inspected: it needs a key, and a rate of zero then keeps every weight.
    """
    try:
        rate = float(dropout_p)
    except jax.errors.ConcretizationTypeError:
        rate = None
    if rate is not None:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got dropout_p={dropout_p}")
        if rate == 0.0:
            return None
    if dropout_key is None:
        raise ValueError(f"dropout_p={dropout_p} > 0 needs a dropout_key, got None")
    return jnp.asarray(dropout_p, jnp.float32)


def _split_heads(x, num_kv_heads: int, group: int):
    """`[N|1, T|1, S|1]`, `[T|1, S|1]` or `[S]` -> `[K|1, G|1, T|1, S|1]`."""
    if x.ndim < 3:
        return x.reshape((1,) * (4 - x.ndim) + x.shape)
    if x.shape[0] == 1:
        return x[None]
    return x.reshape(num_kv_heads, group, *x.shape[1:])


def _window(local_window_size) -> tuple[int, int] | None:
    if local_window_size is None:
        return None
    if isinstance(local_window_size, int):
        local_window_size = (local_window_size, local_window_size)
    left, right = (int(w) for w in local_window_size)
    if left < 0 or right < 0:
        raise ValueError(
            f"local_window_size must be non-negative, got local_window_size={(left, right)}"
        )
    return left, right


def _length(length):
    return None if length is None else jnp.asarray(length, dtype=jnp.int32)


def _seq_length(length, name: str, seq_name: str, seq: int):
    """A real length as an int32 scalar in `[0, seq]`: a concrete one outside raises, a traced
    one (under `jit` or `vmap`), which cannot be inspected, is clipped."""
    if length is None:
        return None
    try:
        value = int(length)
    except jax.errors.ConcretizationTypeError:
        value = None
    if value is not None and not 0 <= value <= seq:
        raise ValueError(
            f"{name}={value} is outside [0, {seq}]: it counts the real positions among the "
            f"{seq_name}={seq} of this call"
        )
    return jnp.clip(jnp.asarray(length, dtype=jnp.int32), 0, seq)


def _as_arrays(*xs):
    """NumPy arguments as jax arrays (`None` stays `None`), as jax.nn converts them."""
    return tuple(None if x is None else jnp.asarray(x) for x in xs)


def _seed(key):
    return jax.random.bits(key, (2,), jnp.uint32)


def _describe(x) -> str:
    return "None" if x is None else f"array of shape {tuple(x.shape)}"
