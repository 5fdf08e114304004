"""OIDC bearer tokens for the worklist's API use (``Authorization: Bearer <JWT>``): signed by
the hospital's identity provider, checked offline against its JWKS (a file: the worklist
fetches nothing), issuer, audience, expiry, and a roles claim naming exactly one worklist
role. A bearer token is never sent by a browser on its own, so requests made with one need
no CSRF token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt

from shared.security.accounts import ROLES, Account

ALGORITHMS = ["RS256", "ES256"]
LEEWAY_S = 30


class BearerVerifier:
    def __init__(self, issuer: str, audience: str, jwks: dict[str, Any], roles_claim: str) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys = jwt.PyJWKSet.from_dict(jwks)
        self.roles_claim = roles_claim

    @classmethod
    def from_file(
        cls, issuer: str, audience: str, jwks_file: Path, roles_claim: str
    ) -> BearerVerifier:
        return cls(issuer, audience, json.loads(jwks_file.read_text()), roles_claim)

    def verify(self, token: str) -> tuple[Account, float] | None:
        """The account a valid token stands for and when it expires; None for any other."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key = next((k for k in self.keys.keys if k.key_id == kid), None)
            if key is None:
                return None
            claims = jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_S,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        granted = claims.get(self.roles_claim)
        roles = [r for r in ROLES if isinstance(granted, list) and r in granted]
        if len(roles) != 1:
            return None  # no worklist role, or both: refused rather than guessed
        name = str(claims.get("preferred_username") or claims["sub"])[:64]
        return Account(name, roles[0], hash=""), float(claims["exp"])
