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
    )
    from ._lstm import LSTM as LSTM, LSTMCell as LSTMCell
    from ._masks import (
        combine_masks as combine_masks,
        cross_attention_mask as cross_attention_mask,
        make_attention_mask as make_attention_mask,
        make_causal_mask as make_causal_mask,
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
    "attend",
    "combine_masks",
    "cross_attention_mask",
    "dot_product_attention",
    "dot_product_attention_weights",
    "from_zigzag",
    "make_attention_mask",
    "make_causal_mask",
    "ring_attention",
    "shard_heads",
    "to_zigzag",
    "zigzag_indices",
]
