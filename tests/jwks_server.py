"""A test identity provider: a JSON Web Key Set served over real HTTP, and tokens signed with
its keys.

    with JwksServer() as idp:
        token = idp.token({"sub": "dr-who", "roles": ["clinician"], ...})   # RS256, kid "rsa-1"
        token = idp.token(claims, kid="ec-1")                               # ES256
        idp.url        # http://127.0.0.1:<port>/jwks.json
        idp.fetches    # how many times the key set was fetched (caching checks)

Keys are made with `cryptography` (RSA 2048 and EC P-256), published as public JWKs
(PyJWT's `to_jwk`). `token(..., sign_with=other)` signs with a key the set does not publish
(under a kid that it does, or any kid), for tampering and unknown-key cases. `stop()` closes
the port, so the set becomes unreachable.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test/realms/hospital"
AUDIENCE = "safetynet"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def new_rsa_key() -> rsa.RSAPrivateKey:
    """A fresh RSA 2048 private key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_ec_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(key: PrivateKey, kid: str) -> dict[str, Any]:
    """The public half of `key` as a JWK with `kid`, `use` sig and `alg`."""
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = dict(RSAAlgorithm.to_jwk(key.public_key(), as_dict=True))
        jwk["alg"] = "RS256"
    else:
        jwk = dict(ECAlgorithm.to_jwk(key.public_key(), as_dict=True))
        jwk["alg"] = "ES256"
    jwk.update(kid=kid, use="sig")
    return jwk


class JwksServer:
    """The key set on a real port, with RSA (`rsa-1`) and EC (`ec-1`) keys."""

    def __init__(self) -> None:
        self.keys: dict[str, PrivateKey] = {"rsa-1": new_rsa_key(), "ec-1": new_ec_key()}
        self.fetches = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                with owner._lock:
                    owner.fetches += 1
                    body = json.dumps(
                        {"keys": [public_jwk(k, kid) for kid, k in owner.keys.items()]}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """The JWKS URL."""
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def __enter__(self) -> JwksServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Close the port (idempotent): fetching the key set fails from now on."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Valid claims for a clinician (C9001), good for five minutes, with `overrides`
        (a value of None removes the claim)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "dr-jwt",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "roles": ["clinician"],
            "fhirUser": "Practitioner/C9001",
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self,
        claims: Mapping[str, Any],
        *,
        kid: str = "rsa-1",
        sign_with: PrivateKey | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A JWT with `claims`, signed with the key `kid` names (or `sign_with`), carrying
        `kid` in its header."""
        key = sign_with if sign_with is not None else self.keys[kid]
        algorithm = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
        return jwt.encode(
            dict(claims), key, algorithm=algorithm, headers={"kid": kid, **(headers or {})}
        )
