"""Draw the attention-pattern figures of the mask cookbook (docs/guides/masks.md).

Every picture comes from the library itself: `dot_product_attention_weights` with all-zero
queries and keys gives uniform weights over exactly the keys a query may see, so the figures
show what the kernels do rather than a re-drawing of the rule.

    python docs/scripts/mask_figures.py            # writes docs/images/mask_*.png
    python docs/scripts/mask_figures.py --out DIR  # somewhere else
"""

import argparse
import pathlib

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import eqx_attention as ea  # noqa: E402

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "images"
T = 12
QK_SIZE = 4


def visible(q_seq: int = T, kv_seq: int = T, num_heads: int = 1, **kwargs) -> np.ndarray:
    """Which keys each query sees, `(q_seq, kv_seq)`, for the given attention arguments."""
    weights = weights_of(q_seq, kv_seq, num_heads, **kwargs)
    return np.asarray(weights[0] > 0)


def weights_of(q_seq: int = T, kv_seq: int = T, num_heads: int = 1, **kwargs) -> np.ndarray:
    query = jnp.zeros((q_seq, num_heads, QK_SIZE))
    key = jnp.zeros((kv_seq, num_heads, QK_SIZE))
    return np.asarray(ea.dot_product_attention_weights(query, key, **kwargs))


SEGMENTS = jnp.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2])


def with_sink_column(weights: np.ndarray) -> np.ndarray:
    """Append the sink's share of each row, `1 - sum(weights)`, as one more column."""
    return np.concatenate([weights, 1.0 - weights.sum(axis=-1, keepdims=True)], axis=-1)


def alibi_bias(slopes: jnp.ndarray, q_seq: int, kv_seq: int) -> jnp.ndarray:
    """ALiBi as an additive bias, `(num_heads, q_seq, kv_seq)`, as in the cookbook."""
    distance = jnp.arange(q_seq)[:, None] - jnp.arange(kv_seq)[None, :]
    return -slopes[:, None, None] * jnp.abs(distance)[None]


# name -> list of (panel title, matrix, is_weights). Each name becomes docs/images/mask_NAME.png.
def figures() -> dict[str, list[tuple[str, np.ndarray, bool]]]:
    # A steep and a shallow slope, to show the range of heads (the paper's 8-head slopes run
    # from 1/2 down to 1/256).
    alibi = weights_of(num_heads=2, bias=alibi_bias(jnp.array([1.0, 0.25]), T, T), is_causal=True)
    # Zero queries and keys make every logit 0, so a row's keys share what the sink leaves.
    sunk = weights_of(num_heads=2, sinks=jnp.array([0.0, 2.0]), is_causal=True)
    return {
        "causal": [
            ("is_causal=True", visible(is_causal=True), False),
            ("4 queries, 12 keys: bottom-right", visible(q_seq=4, is_causal=True), False),
        ],
        "padding": [
            (
                "query_seq_length=9,\nkey_value_seq_length=9",
                visible(query_seq_length=9, key_value_seq_length=9),
                False,
            ),
            (
                "... and is_causal=True",
                visible(query_seq_length=9, key_value_seq_length=9, is_causal=True),
                False,
            ),
        ],
        "window": [
            ("local_window_size=2", visible(local_window_size=2), False),
            (
                "local_window_size=(3, 0)\n+ is_causal=True",
                visible(local_window_size=(3, 0), is_causal=True),
                False,
            ),
        ],
        "segments": [
            (
                "segment ids 0 0 0 0 0 1 1 1 2 2 2 2",
                visible(query_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS),
                False,
            ),
            (
                "... and is_causal=True",
                visible(query_segment_ids=SEGMENTS, kv_segment_ids=SEGMENTS, is_causal=True),
                False,
            ),
        ],
        "prefix_lm": [
            (
                "mask_mod: prefix of 4, then causal",
                visible(mask_mod=lambda q, k: (k <= q) | (k < 4)),
                False,
            ),
        ],
        "cross": [
            (
                "6 queries (4 real), 10 keys (7 real)",
                visible(
                    q_seq=6,
                    kv_seq=10,
                    mask=ea.cross_attention_mask(jnp.arange(6) < 4, jnp.arange(10) < 7),
                ),
                False,
            ),
        ],
        "alibi": [
            ("ALiBi, slope 1, causal", alibi[0], True),
            ("ALiBi, slope 1/4, causal", alibi[1], True),
        ],
        "sinks": [
            ("sink logit 0, causal\n(last column: the sink)", with_sink_column(sunk[0]), True),
            ("sink logit 2, causal\n(last column: the sink)", with_sink_column(sunk[1]), True),
        ],
    }


def draw(panels: list[tuple[str, np.ndarray, bool]], path: pathlib.Path) -> None:
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
    for ax, (title, matrix, is_weights) in zip(axes[0], panels, strict=True):
        q_seq, kv_seq = matrix.shape
        if is_weights:
            image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
        else:
            ax.imshow(matrix, cmap="Blues", vmin=-0.3, vmax=1.0)
        # Grid lines between cells make individual (query, key) pairs countable.
        ax.set_xticks(np.arange(-0.5, kv_seq), minor=True)
        ax.set_yticks(np.arange(-0.5, q_seq), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(0, kv_seq, 2))
        ax.set_yticks(range(0, q_seq, 2) if q_seq > 6 else range(q_seq))
        ax.set_xlabel("key position")
        ax.set_ylabel("query row")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    # No software/version metadata: regenerating with the same inputs gives the same bytes.
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(out: pathlib.Path) -> list[pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, panels in figures().items():
        path = out / f"mask_{name}.png"
        draw(panels, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    for written in main(parser.parse_args().out):
        print(written)
