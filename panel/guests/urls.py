"""Page routes (panel/guests)."""

from __future__ import annotations

urlpatterns: list[object] = []
