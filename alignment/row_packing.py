"""Row width and first-fit-decreasing assignment of token segments to rows, shared by the plain
collator (:func:`alignment.batching.collate_sequences`) and the prompt-sharing one
(:func:`alignment.prompt_sharing.collate_shared_prompt`)."""

from __future__ import annotations

from collections.abc import Sequence


def row_width(lengths: Sequence[int], pad_to_multiple_of: int | None = None) -> int:
    """The longest segment, rounded up to ``pad_to_multiple_of`` when given."""
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def first_fit_decreasing(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Segment indices per row: longest first, each into the first row with room. Rows are no
    wider than ``width`` (at least the longest segment): no padding inside the model's linear
    layers, and attention stays O(rows * width^2), not O(total^2)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        r = next((r for r, room in enumerate(free) if room >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return rows
