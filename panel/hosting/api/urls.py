"""API routes (panel/hosting/api)."""

from __future__ import annotations

urlpatterns: list[object] = []
