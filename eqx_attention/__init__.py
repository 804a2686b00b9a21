"""eqx_attention: Equinox-style attention for JAX.

Every public function and module method is shape-checked at trace time by jaxtyping +
beartype: the import hook below decorates the whole package.
"""

from jaxtyping import install_import_hook

with install_import_hook("eqx_attention", "beartype.beartype"):
    from ._cache import KVCache as KVCache, SlidingWindowKVCache as SlidingWindowKVCache
    from ._cross_attention import (
        CrossAttention as CrossAttention,
        KVQAttention as KVQAttention,
        QKVAttention as QKVAttention,
        SelfAttention as SelfAttention,
        attend as attend,
    )
    from ._encoding import (
        Decoding as Decoding,
        EmbedDecoding as EmbedDecoding,
        Encoding as Encoding,
        MultimodalDecoding as MultimodalDecoding,
        MultimodalEncoding as MultimodalEncoding,
        MultimodalPositionalEncoding as MultimodalPositionalEncoding,
    )
    from ._feedforward import FeedForward as FeedForward
    from ._fourier import FourierPositionEncoding as FourierPositionEncoding
    from ._functional import (
        dot_product_attention as dot_product_attention,
        dot_product_attention_weights as dot_product_attention_weights,
        make_block_plan as make_block_plan,
    )
    from ._kernels import BlockPlan as BlockPlan
    from ._lstm import LSTM as LSTM, LSTMCell as LSTMCell
    from ._masks import (
        and_mask_mods as and_mask_mods,
        chunked_mask_mod as chunked_mask_mod,
        combine_masks as combine_masks,
        cross_attention_mask as cross_attention_mask,
        document_mask_mod as document_mask_mod,
        global_tokens_mask_mod as global_tokens_mask_mod,
        make_attention_mask as make_attention_mask,
        make_causal_mask as make_causal_mask,
        or_mask_mods as or_mask_mods,
        prefix_lm_mask_mod as prefix_lm_mask_mod,
        sliding_window_mask_mod as sliding_window_mask_mod,
    )
    from ._mha import MultiheadAttention as MultiheadAttention
    from ._perceiver import (
        CrossAttentionBlock as CrossAttentionBlock,
        PerceiverDecoder as PerceiverDecoder,
        PerceiverEncoder as PerceiverEncoder,
        PerceiverIO as PerceiverIO,
        SelfAttentionBlock as SelfAttentionBlock,
    )
    from ._positional import (
        LinearRopeScaling as LinearRopeScaling,
        Llama3RopeScaling as Llama3RopeScaling,
        RotaryPositionalEmbedding as RotaryPositionalEmbedding,
        SinusoidalPositionalEmbedding as SinusoidalPositionalEmbedding,
    )
    from ._sharding import (
        from_zigzag as from_zigzag,
        ring_attention as ring_attention,
        shard_heads as shard_heads,
        to_zigzag as to_zigzag,
        zigzag_indices as zigzag_indices,
    )
    from ._trainable import (
        TrainablePositionalEncoding as TrainablePositionalEncoding,
        TrainablePositionalMasking as TrainablePositionalMasking,
        TrainablePositionalPadding as TrainablePositionalPadding,
    )

__all__ = [
    "BlockPlan",
    "CrossAttention",
    "CrossAttentionBlock",
    "Decoding",
    "EmbedDecoding",
    "Encoding",
    "FeedForward",
    "FourierPositionEncoding",
    "KVCache",
    "KVQAttention",
    "LSTM",
    "LSTMCell",
    "LinearRopeScaling",
    "Llama3RopeScaling",
    "MultiheadAttention",
    "MultimodalDecoding",
    "MultimodalEncoding",
    "MultimodalPositionalEncoding",
    "PerceiverDecoder",
    "PerceiverEncoder",
    "PerceiverIO",
    "QKVAttention",
    "RotaryPositionalEmbedding",
    "SelfAttention",
    "SelfAttentionBlock",
    "SinusoidalPositionalEmbedding",
    "SlidingWindowKVCache",
    "TrainablePositionalEncoding",
    "TrainablePositionalMasking",
    "TrainablePositionalPadding",
    "and_mask_mods",
    "attend",
    "chunked_mask_mod",
    "combine_masks",
    "cross_attention_mask",
    "document_mask_mod",
    "dot_product_attention",
    "dot_product_attention_weights",
    "from_zigzag",
    "global_tokens_mask_mod",
    "make_attention_mask",
    "make_block_plan",
    "make_causal_mask",
    "or_mask_mods",
    "prefix_lm_mask_mod",
    "ring_attention",
    "sliding_window_mask_mod",
    "shard_heads",
    "to_zigzag",
    "zigzag_indices",
]
