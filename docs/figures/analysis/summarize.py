"""Reduces the `lorakit analyze --json` outputs of the run in docs/analysis.md to the numbers the doc quotes.

The full outputs (every singular value and every φ(i, j) of 60 layers) are megabytes; this writes
summary.json beside this file: per module kind the medians (and ranges) of the amplification columns, the
effective ranks, and φ at the (i, j) the doc's tables show, plus every layer's amplification factor.
Run: python docs/figures/analysis/summarize.py r8_r64.json r8_seeds.json r64.json
(analyze r=8 s0 against r=64 s0; r=8 s0 against r=8 s1; r=64 s0 alone)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

PHI_POINTS = [(1, 1), (2, 2), (4, 4), (8, 8), (1, 64), (8, 64)]


def by_kind(layers: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = defaultdict(list)
    for layer in layers:
        kinds[layer["module"].rsplit(".", 1)[-1]].append(layer)
    return dict(kinds)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def amplification(analysis: dict) -> dict:
    out = {}
    for kind, layers in by_kind(analysis["layers"]).items():
        amp = [layer["amplification"] for layer in layers]
        out[kind] = {key: spread([a[key] for a in amp])
                     for key in ("factor", "delta_norm", "weight_norm", "on_delta", "on_weight", "on_random")}
        out[kind]["rank"] = amp[0]["rank"]
        out[kind]["effective_rank_90"] = spread([layer["effective_rank_90"] for layer in layers])
        out[kind]["effective_rank_99"] = spread([layer["effective_rank_99"] for layer in layers])
        out[kind]["factor_per_layer"] = {layer["module"]: layer["amplification"]["factor"] for layer in layers}
    return out


def similarity(analysis: dict) -> dict:
    out = {}
    for kind, layers in by_kind(analysis["layers"]).items():
        entry = {}
        for grid_name in ("similarity_A", "similarity_delta"):
            points = {}
            for i, j in PHI_POINTS:
                values = [layer[grid_name][i - 1][j - 1] for layer in layers
                          if len(layer[grid_name]) >= i and len(layer[grid_name][0]) >= j]
                if values:
                    points[f"phi({i},{j})"] = spread(values)
            entry[grid_name] = points
        entry["phi_A(1,1)_per_layer"] = {layer["module"]: layer["similarity_A"][0][0] for layer in layers}
        out[kind] = entry
    return out


def main(r8_r64: str, r8_seeds: str, r64: str) -> None:
    first, seeds, wide = (json.loads(Path(p).read_text()) for p in (r8_r64, r8_seeds, r64))
    summary = {
        "sources": {"r8_vs_r64": [first["adapter"], first["other"]], "r8_seed_vs_seed": [seeds["adapter"], seeds["other"]],
                    "r64": wide["adapter"]},
        "amplification": {"r8_s0": amplification(first), "r64_s0": amplification(wide)},
        "similarity": {"r8_vs_r64": similarity(first), "r8_seed0_vs_seed1": similarity(seeds)},
    }
    out = Path(__file__).with_name("summary.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
