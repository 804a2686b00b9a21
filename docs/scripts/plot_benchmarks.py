"""Plot attention time against sequence length from the benchmark's JSON results.

    python docs/scripts/plot_benchmarks.py                    # the default paths below
    python docs/scripts/plot_benchmarks.py RESULTS --out PNG

RESULTS is what `benchmarks/attention.py` writes: an object whose `rows` hold one
measurement each, `{"implementation": "eqx_attention", "T": 2048, "causal": false,
"fwd_ms": 12.3, "fwdbwd_ms": 45.6}`, next to facts about the run (`backend`, `device`,
`dtype`) that go into the title. A bare JSON list of rows is accepted too. A missing row or
a null time (out of memory, skipped as too slow) leaves a gap in that line. The figure has
one panel per (pass, masking): forward and forward+backward, full and causal.
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "attention.json"
DEFAULT_OUT = ROOT / "docs" / "images" / "benchmark_attention.png"

# This library's implementations solid, the anchors it is compared with dashed, each in a
# fixed colour so an implementation looks the same in every panel and every regeneration.
STYLES = {
    "eqx_attention": {"color": "tab:blue", "linestyle": "-", "marker": "o"},
    "eqx_attention[chunked]": {"color": "tab:cyan", "linestyle": "-", "marker": "o"},
    "eqx_attention[xla]": {"color": "tab:green", "linestyle": "-", "marker": "s"},
    "jax.nn": {"color": "tab:orange", "linestyle": "--", "marker": "D"},
    "jax.nn[cudnn]": {"color": "tab:purple", "linestyle": "--", "marker": "^"},
    "equinox-style": {"color": "tab:red", "linestyle": "--", "marker": "v"},
}
PASSES = (("fwd_ms", "forward"), ("fwdbwd_ms", "forward + backward"))


def load(path: pathlib.Path) -> tuple[list[dict], dict]:
    """The rows of a results file and the facts about the run (possibly none)."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        if not isinstance(data.get("rows"), list):
            raise ValueError(f"{path}: expected a 'rows' list, got keys {sorted(data)}")
        rows, meta = data["rows"], {k: v for k, v in data.items() if k != "rows"}
    elif isinstance(data, list):
        rows, meta = data, {}
    else:
        raise ValueError(f"{path}: expected a JSON object or list, got {type(data).__name__}")
    required = {"implementation", "T", "causal"}
    for i, row in enumerate(rows):
        if not required <= row.keys():
            raise ValueError(f"{path}: row {i} lacks {sorted(required - row.keys())}: {row}")
    return rows, meta


def plot(rows: list[dict], meta: dict, out: pathlib.Path) -> None:
    causal_values = sorted({bool(r["causal"]) for r in rows})
    implementations = sorted({r["implementation"] for r in rows}, key=_order)
    fig, axes = plt.subplots(
        len(causal_values),
        len(PASSES),
        figsize=(5.5 * len(PASSES), 3.8 * len(causal_values)),
        squeeze=False,
    )
    for i, causal in enumerate(causal_values):
        for j, (field, label) in enumerate(PASSES):
            ax = axes[i][j]
            for impl in implementations:
                points = sorted(
                    (r["T"], r[field])
                    for r in rows
                    if r["implementation"] == impl
                    and bool(r["causal"]) == causal
                    and r.get(field) is not None
                )
                if points:
                    ts, ms = zip(*points, strict=True)
                    ax.plot(ts, ms, label=impl, **STYLES.get(impl, {"marker": "x"}))
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel("time per call (ms)")
            ax.set_title(f"{label}, {'causal' if causal else 'full'} attention", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    facts = [str(meta[k]) for k in ("device", "backend", "dtype") if k in meta]
    if facts:
        fig.suptitle(", ".join(facts), fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # No software/version metadata: the same results always give the same bytes.
    fig.savefig(out, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _order(impl: str) -> tuple[int, str]:
    known = list(STYLES)
    return (known.index(impl) if impl in known else len(known), impl)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=pathlib.Path, nargs="?", default=DEFAULT_RESULTS)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    plot(*load(args.results), args.out)
    print(args.out)
