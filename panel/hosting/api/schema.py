"""OpenAPI pieces drf-spectacular cannot guess: the `Token vp_...` scheme."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension

__all__ = ["TokenScheme"]


class TokenScheme(OpenApiAuthenticationExtension):  # type: ignore[misc]
    target_class = "panel.hosting.api.authentication.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token vp_...`: a named API token (POST /api/v1/tokens/); "
                           "expired and revoked tokens are refused",
        }
