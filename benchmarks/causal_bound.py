"""The largest causal speed-up any tiling can reach at one length, given this machine's tiles.

Run by hand (never part of the tests; about two minutes at the default length):

    .venv/bin/python benchmarks/causal_bound.py --length 2048

Skipping blocks saves only what the tiles allow. This script measures what one online-softmax
tile costs here for each shape the kernel could use (`benchmarks/tiles.py`'s step: one
key/value head, batch 2, head size 64, float32), with and without a causal mask, the tiles
taking turns so that they see the same machine load. It then cuts queries and keys into groups
of 256 and searches every way to cover the causal triangle exactly once with tiles of one or
two query groups by one or two key groups. The groups of a tile need not be neighbours, so
the search includes tilings a contiguous blockwise kernel cannot express. Tiles that touch the
diagonal, or that include pairs the mask hides, cost the masked price.

It prints the speed-up (non-causal time / causal time) that the measured costs allow for the
kernel's own tiling (whole 512 x 512 blocks) and for the best tiling there is: the search is
exhaustive, so no tiling of these shapes does better. Non-causal time is the whole square in
the cheapest unmasked shape.
"""

import argparse
import itertools

from attention import best_times
from tiles import STEPS, tile_inputs, tile_loop

GROUP = 256
# (query groups, key groups) of each tile shape.
SHAPES = ((2, 2), (2, 1), (1, 2), (1, 1))


def measure_costs(repeats: int) -> dict[tuple[int, int, bool], float]:
    """Seconds per tile, by (query groups, key groups, masked)."""
    loops = {}
    for rows, cols in SHAPES:
        q, k, v = tile_inputs(rows * GROUP, cols * GROUP)
        for masked in (False, True):
            loop = tile_loop(rows * GROUP, cols * GROUP, masked)
            loops[rows, cols, masked] = lambda loop=loop, q=q, k=k, v=v: loop(q, k, v)
    return {shape: t / STEPS for shape, t in best_times(loops, repeats=repeats).items()}


def candidate_tiles(n: int, costs):
    """Every tile over `n` groups that covers a needed (query, key) pair: (cost, cells)."""
    needed = {(r, c) for r in range(n) for c in range(r + 1)}
    tiles = []
    for rows, cols in SHAPES:
        for qs in itertools.combinations(range(n), rows):
            for ks in itertools.combinations(range(n), cols):
                cells = frozenset((r, c) for r in qs for c in ks if (r, c) in needed)
                if cells:
                    # Full tiles below the diagonal need no mask; the rest are masked.
                    masked = len(cells) < rows * cols or any(r == c for r, c in cells)
                    tiles.append((costs[rows, cols, masked], cells))
    return needed, tiles


def kernel_tiling(n: int, costs) -> float:
    """Whole 512 x 512 blocks: each query block's full blocks plus one masked diagonal one."""
    blocks = n // 2
    full = blocks * (blocks - 1) // 2
    return full * costs[2, 2, False] + blocks * costs[2, 2, True]


def cheapest_cover(n: int, costs, start: float) -> float:
    """The cost of the cheapest exact cover of the causal triangle, or `start` if none is cheaper.

    Depth-first over the lowest uncovered pair, pruned by the cheapest cost per pair.
    """
    needed, tiles = candidate_tiles(n, costs)
    per_cell = min(cost / len(cells) for cost, cells in tiles)
    by_cell: dict = {}
    for tile in sorted(tiles, key=lambda t: t[0] / len(t[1])):
        for cell in tile[1]:
            by_cell.setdefault(cell, []).append(tile)
    best = start

    def search(left: frozenset, spent: float):
        nonlocal best
        if spent + per_cell * len(left) >= best:
            return
        if not left:
            best = spent
            return
        for cost, cells in by_cell[min(left)]:
            if cells <= left:
                search(left - cells, spent + cost)

    search(frozenset(needed), 0.0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The exhaustive search takes about two minutes at 2048 and grows too fast to go further.
    parser.add_argument("--length", type=int, default=2048, choices=(1024, 2048))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    n = args.length // GROUP
    costs = measure_costs(args.repeats)
    print(f"{'tile':>9} {'ns/logit, no mask':>18} {'masked':>7}")
    for rows, cols in SHAPES:
        logits = 2 * rows * cols * GROUP**2  # batch 2
        plain, masked = (costs[rows, cols, m] / logits * 1e9 for m in (False, True))
        print(f"{rows * GROUP:>4}x{cols * GROUP:<4} {plain:18.2f} {masked:7.2f}")
    # Non-causal attention at its cheapest: the whole square in the cheapest unmasked shape.
    non_causal = n * n * min(costs[r, c, False] / (r * c) for r, c in SHAPES)
    ours = kernel_tiling(n, costs)
    best = cheapest_cover(n, costs, start=ours)
    print(f"\nT={args.length}: largest causal speed-up (non-causal / causal tile time)")
    print(f"  the kernel's 512 x 512 blocks: {non_causal / ours:.2f}x")
    print(f"  the best tiling of any groups: {non_causal / best:.2f}x")


if __name__ == "__main__":
    main()
