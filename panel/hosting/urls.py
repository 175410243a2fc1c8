"""Page routes (panel/hosting)."""

from __future__ import annotations

urlpatterns: list[object] = []
