"""eqx_attention: Equinox-style attention for JAX.

Every public function and module method is shape-checked at trace time by jaxtyping +
beartype: the import hook below decorates the whole package.
"""

from jaxtyping import install_import_hook

with install_import_hook("eqx_attention", "beartype.beartype"):
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

__all__ = [
    "combine_masks",
    "cross_attention_mask",
    "dot_product_attention",
    "dot_product_attention_weights",
    "make_attention_mask",
    "make_causal_mask",
]
