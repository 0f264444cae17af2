"""Bearer tokens with scopes read < write < admin, configured in settings.

With no tokens configured every request is allowed, which is why the server then refuses
to listen on anything but loopback (see shardd.server).  Tokens are compared in constant
time against every configured token, so timing reveals neither a prefix nor a position.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import Forbidden, Unauthorized

SCOPES = ("read", "write", "admin")


def _implied(scope: str) -> frozenset[str]:
    return frozenset(SCOPES[: SCOPES.index(scope) + 1])


@dataclass(frozen=True)
class TokenTable:
    tokens: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, specs: Iterable[str]) -> TokenTable:
        tokens = []
        for spec in specs:
            secret, sep, scopes = spec.rpartition(":")
            if not sep or not secret:
                raise ValueError("tokens look like SECRET:SCOPE[,SCOPE]")
            granted: set[str] = set()
            for scope in scopes.split(","):
                scope = scope.strip()
                if scope not in SCOPES:
                    raise ValueError(f"unknown scope {scope!r}; scopes are {', '.join(SCOPES)}")
                granted |= _implied(scope)
            tokens.append((secret.encode("utf-8"), frozenset(granted)))
        return cls(tuple(tokens))

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self, authorization: str | None, scope: str | None) -> None:
        """Raise 401/403 unless the Authorization header grants ``scope``."""
        if scope is None or not self.enabled:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("a bearer token is required")
        presented = authorization[len("Bearer ") :].strip().encode("utf-8", "replace")
        granted: frozenset[str] | None = None
        for secret, scopes in self.tokens:
            if hmac.compare_digest(secret, presented):
                granted = scopes
        if granted is None:
            raise Unauthorized("unknown token")
        if scope not in granted:
            raise Forbidden(f"this token lacks the {scope} scope")
