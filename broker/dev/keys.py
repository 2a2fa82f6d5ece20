"""Demo signing keys for `broker dev`: a local issuer with a JWKS file and a token minter.

For the local stack only; a real deployment trusts SPIRE, Kubernetes or a CI provider.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

AUDIENCE = "credential-broker"


@dataclass(frozen=True)
class DemoIssuer:
    name: str
    issuer: str
    kid: str
    key_path: Path
    jwks_path: Path

    @classmethod
    def create(cls, directory: Path, name: str) -> DemoIssuer:
        key = ec.generate_private_key(ec.SECP256R1())
        kid = uuid.uuid4().hex[:16]
        key_path = directory / f"{name}-key.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        jwk: dict[str, Any] = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
        jwks_path = directory / f"{name}-jwks.json"
        jwks_path.write_text(json.dumps({"keys": [jwk]}, indent=2))
        return cls(name, f"https://{name}.broker.local", kid, key_path, jwks_path)

    @classmethod
    def load(cls, directory: Path, name: str) -> DemoIssuer:
        """The issuer `create` wrote into `directory` (for `broker dev token`)."""
        jwks_path = directory / f"{name}-jwks.json"
        key_path = directory / f"{name}-key.pem"
        if not jwks_path.exists() or not key_path.exists():
            raise FileNotFoundError(f"no {name} keys in {directory}: is `broker dev` running there?")
        kid = str(json.loads(jwks_path.read_text())["keys"][0]["kid"])
        return cls(name, f"https://{name}.broker.local", kid, key_path, jwks_path)

    def mint(self, sub: str, *, lifetime: int = 8 * 3600, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.issuer, "sub": sub, "aud": [AUDIENCE], "iat": now, "nbf": now,
            "exp": now + lifetime, "jti": uuid.uuid4().hex, **claims,
        }  # fmt: skip
        return jwt.encode(payload, self.key_path.read_bytes(), algorithm="ES256", headers={"kid": self.kid})
