"""docs/config.md documents every NAME.conf key the agent knows (the foundation issue:
"document every key in docs/config.md")."""

from __future__ import annotations

import re
from pathlib import Path

from hostagent.conf import KNOWN_KEYS

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def documented_keys() -> set[str]:
    """Keys with a row of their own in a table of docs/config.md: `| [`KEY`](#...) |`
    in the table of keys, `| `KEY` |` in the table of resource limits."""
    return set(re.findall(r"^\| \[?`([A-Z][A-Z0-9_]*)`", DOC.read_text(), re.M))


def test_every_known_key_has_a_row_in_docs_config_md() -> None:
    assert [k for k in KNOWN_KEYS if k not in documented_keys()] == []

