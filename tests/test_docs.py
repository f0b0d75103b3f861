"""The IT guide's troubleshooting table names every reason the code can report."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATTERNS = (
    re.compile(r'reason\s*=\s*"([a-z_]+)"'),  # class attributes and keyword arguments
    re.compile(r'IngestOutcome\(\s*[A-Z_]+,\s*"([a-z_]+)"'),  # C-STORE refusals
    re.compile(r"reason = '([a-z_]+)'"),  # set in SQL
    re.compile(r'\.labels\("([a-z_]+)"\)'),  # failure metrics
)


def reasons_in_code() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "src" / "ms_forecast_node").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in PATTERNS:
            found.update(pattern.findall(text))
    return found


def test_every_reason_is_in_the_troubleshooting_table() -> None:
    guide = (REPO / "docs" / "it-guide.md").read_text(encoding="utf-8")
    table = guide[guide.index("## 6. Troubleshooting") :]
    reasons = reasons_in_code()
    assert len(reasons) > 30  # the patterns really find the reasons
    missing = sorted(r for r in reasons if f"`{r}`" not in table)
    assert not missing, f"reasons missing from docs/it-guide.md: {missing}"
