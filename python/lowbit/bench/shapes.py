"""Layer shape sets ``(K, N)`` = (in_features, out_features) for benchmarks and tuning."""

from __future__ import annotations

import csv
import os

SHAPE_SETS: dict[str, list[tuple[int, int]]] = {
    # attention output (and q), MLP up/gate, MLP down
    "llama3-8b": [(4096, 4096), (4096, 14336), (14336, 4096)],
    # q/o, fused k+v (8 KV heads of 128), MLP up/gate, MLP down
    "mistral-7b": [(4096, 4096), (4096, 2048), (4096, 14336), (14336, 4096)],
    # all-MiniLM-L6-v2: attention projections, MLP up, MLP down
    "minilm": [(384, 384), (384, 1536), (1536, 384)],
}


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    """A set name, a CSV file with columns ``k,n`` (header optional), or ``KxN,KxN``."""
    if spec in SHAPE_SETS:
        return SHAPE_SETS[spec]
    if os.path.isfile(spec):
        shapes = []
        with open(spec, newline="") as f:
            for row in csv.reader(f):
                if not row or row[0].strip().lower() in ("k", "in_features", "#"):
                    continue
                try:
                    shapes.append((int(row[0]), int(row[1])))
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{spec}: expected rows 'k,n', got {row}") from e
        if not shapes:
            raise ValueError(f"{spec}: no shapes found")
        return shapes
    try:
        return [tuple(int(v) for v in part.lower().split("x")) for part in spec.split(",")]  # type: ignore[misc]
    except ValueError as e:
        raise ValueError(f"shapes {spec!r}: not a set ({', '.join(SHAPE_SETS)}), a CSV file, or KxN[,KxN...]") from e
