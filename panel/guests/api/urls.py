"""API routes (panel/guests/api)."""

from __future__ import annotations

urlpatterns: list[object] = []
