"""eqx_attention: Equinox-style attention for JAX.

Every public function and module method is shape-checked at trace time by jaxtyping +
beartype: the import hook below decorates the whole package.
"""

from jaxtyping import install_import_hook

with install_import_hook("eqx_attention", "beartype.beartype"):
    from ._cache import KVCache as KVCache, SlidingWindowKVCache as SlidingWindowKVCache
    from ._functional import (
        dot_product_attention as dot_product_attention,
        dot_product_attention_weights as dot_product_attention_weights,
    )
    from ._masks import (
        combine_masks as combine_masks,
        cross_attention_mask as cross_attention_mask,
        make_attention_mask as make_attention_mask,
        make_causal_mask as make_causal_mask,
    )
    from ._mha import MultiheadAttention as MultiheadAttention
    from ._positional import (
        LinearRopeScaling as LinearRopeScaling,
        Llama3RopeScaling as Llama3RopeScaling,
        RotaryPositionalEmbedding as RotaryPositionalEmbedding,
        SinusoidalPositionalEmbedding as SinusoidalPositionalEmbedding,
    )
    from ._sharding import (
        from_zigzag as from_zigzag,
        ring_attention as ring_attention,
        to_zigzag as to_zigzag,
        zigzag_indices as zigzag_indices,
    )

__all__ = [
    "KVCache",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "MultiheadAttention",
    "RotaryPositionalEmbedding",
    "SinusoidalPositionalEmbedding",
    "SlidingWindowKVCache",
    "combine_masks",
    "cross_attention_mask",
    "dot_product_attention",
    "dot_product_attention_weights",
    "from_zigzag",
    "make_attention_mask",
    "make_causal_mask",
    "ring_attention",
    "to_zigzag",
    "zigzag_indices",
]
