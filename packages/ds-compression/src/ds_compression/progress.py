"""Progress bars (tqdm when installed and stderr is a terminal or forced) and the summary table."""
from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar", "format_table"]


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, disable: bool = False) -> Any:
    if disable:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NullBar()
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True, mininterval=1.0)


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table, one row per dict, columns in the given order."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
