"""The rows of fastcal's result tables (``fastcal demo``, ``fastcal zeroshot``): one row per method, its
calibration reports per class group, printed by section.

A row is ``{"section": str, "method": str, "metrics": {group: report}, "notes": {...}}``; a section's
columns are the accuracy and ECE (in percent) of each of its groups, and HM, the harmonic mean of base
and new accuracy, where a section has both.
"""

from __future__ import annotations

from typing import Any, TypedDict

from fastcal.metrics import harmonic_mean


class Row(TypedDict, total=False):
    """One method's line in a table (module docstring); ``stage`` and ``hm_accuracy`` are added by
    ``check_row``."""

    section: str
    method: str
    metrics: dict[str, dict[str, Any]]
    notes: dict[str, Any]
    stage: str
    hm_accuracy: float


def check_row(stage: str, row: Any) -> dict[str, Any]:
    """A stage's row, checked, with ``stage`` and (for base and new groups) ``hm_accuracy`` added."""
    ok = (
        isinstance(row, dict)
        and isinstance(row.get("section"), str)
        and isinstance(row.get("method"), str)
        and isinstance(row.get("metrics"), dict)
        and all(isinstance(r, dict) and "accuracy" in r and "ece" in r for r in row["metrics"].values())
    )
    if not ok:
        raise TypeError(
            f"stage {stage}: expected rows {{'section': str, 'method': str, 'metrics': {{group: report}}}}, "
            f"got {row!r:.200}"
        )
    row = {"stage": stage, **row}
    metrics = row["metrics"]
    if "base" in metrics and "new" in metrics:
        row["hm_accuracy"] = harmonic_mean(metrics["base"]["accuracy"], metrics["new"]["accuracy"])
    return row


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _cell(row: dict[str, Any], group: str, key: str) -> str:
    """A number of the table: with its spread over seeds (``notes["spread"]``) as ``mean±std``, and ``*``
    where ``notes["marks"]`` says it differs from the row it improves on by more than the spread."""
    notes = row.get("notes", {})
    text = _percent(row["metrics"].get(group, {}).get(key))
    spread = notes.get("spread", {}).get(group, {}).get(key)
    if spread is not None:
        text += f"±{100 * spread:.1f}"
    if spread is not None:  # a mark's place in every seeded row keeps the columns aligned
        text += "*" if key in notes.get("marks", {}).get(group, {}) else " "
    return text


def _after_cell(row: dict[str, Any], key: str) -> str:
    """The new classes' ECE after a post-hoc calibrator (``notes["new_ece_after"][key]``), with its spread
    over seeds when there is one."""
    after = row.get("notes", {}).get("new_ece_after", {})
    text = _percent(after.get(key))
    spread = after.get("spread", {}).get(key)
    return text if spread is None else f"{text}±{100 * spread:.1f}"


# (column title, notes["new_ece_after"] key) of the rows that report post-hoc calibration of new classes
AFTER_COLUMNS = (("new ECE +TS", "ts"), ("new ECE +DAC", "dac"))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Rows grouped by section; per section: method, then accuracy and ECE (%) per group, HM, and where
    rows have them the new classes' ECE after TS and after DAC. Rows over several seeds show mean±std; a
    footnote explains the marks."""
    sections: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        sections.setdefault(row["section"], []).append(row)
    blocks = []
    for section, section_rows in sections.items():
        groups: list[str] = []
        for row in section_rows:
            groups.extend(g for g in row["metrics"] if g not in groups)
        with_hm = "base" in groups and "new" in groups
        with_after = any("new_ece_after" in row.get("notes", {}) for row in section_rows)
        header = ["method", *(f"{g} {m}" for g in groups for m in ("acc", "ECE"))] + ["HM"] * with_hm
        header += [title for title, _ in AFTER_COLUMNS] * with_after
        table = [header]
        for row in section_rows:
            label = row["method"]
            temperature = row.get("notes", {}).get("temperature")
            if temperature is not None:
                label += f" (T={temperature:.2f})"
            cells = [label]
            for g in groups:
                cells += [_cell(row, g, "accuracy"), _cell(row, g, "ece")]
            cells += [_percent(row.get("hm_accuracy"))] * with_hm
            table.append(cells + [_after_cell(row, key) for _, key in AFTER_COLUMNS] * with_after)
        widths = [max(len(cells[i]) for cells in table) for i in range(len(header))]
        lines = [
            "  ".join(
                [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
            )
            for cells in table
        ]
        seeds = next((row["notes"]["seeds"] for row in section_rows if "seeds" in row.get("notes", {})), None)
        if seeds is not None:
            lines.append(
                f"(mean±std over seeds {', '.join(map(str, seeds))}; *: off the row it improves on by more "
                "than both standard deviations together)"
            )
        if with_after:
            lines.append(
                "(new ECE +TS / +DAC: the new classes' ECE after temperature scaling / DAC fitted on the "
                "base classes' few-shot validation predictions)"
            )
        blocks.append("\n".join([f"== {section} ==", lines[0], "-" * len(lines[0]), *lines[1:]]))
    return "\n\n".join(blocks)
