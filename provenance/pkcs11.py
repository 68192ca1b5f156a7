"""The signer's Ed25519 key in a PKCS#11 token (an HSM, a smart card, SoftHSM2) instead of a file.

A token key is named `MODULE:TOKEN:LABEL`: the PKCS#11 library to load, the token's label and
the key pair's label. The user PIN comes from $WEIGHTMARK_PKCS11_PIN (never from the command
line, where other users can read it). Signing uses CKM_EDDSA (PKCS#11 v3.0, Ed25519 keys of
key type CKK_EC_EDWARDS); the private key never leaves the token, and its signatures are
ordinary Ed25519 signatures that the usual verifiers check.

`TokenSigningKey` offers the two methods of `Ed25519PrivateKey` that signing needs, `sign()`
and `public_key()`, so the registry, checkpoints and evidence bundles sign through it unchanged.
It needs the optional `python-pkcs11` package (`pip install 'weightmark[hsm]'`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from weightmark.errors import KeyProblem, UsageError

PIN_ENV = "WEIGHTMARK_PKCS11_PIN"
ED25519_OID = "1.3.101.112"

__all__ = ["PIN_ENV", "TokenSigningKey", "TokenSpec"]


@dataclass(frozen=True)
class TokenSpec:
    """Where a token key is: PKCS#11 module path, token label, key label."""

    module: str
    token: str
    label: str

    @classmethod
    def parse(cls, text: str) -> TokenSpec:
        """`MODULE:TOKEN:LABEL` (the module path may itself hold colons; the last two fields may not)."""
        parts = text.rsplit(":", 2)
        if len(parts) != 3 or not all(parts):
            raise UsageError(f"--pkcs11 {text!r}: expected MODULE:TOKEN:LABEL, e.g. "
                             "/usr/lib/softhsm/libsofthsm2.so:lab:signer")
        return cls(*parts)

    def __str__(self) -> str:
        return f"{self.module}:{self.token}:{self.label}"

    def to_json(self) -> dict[str, str]:
        return {"module": self.module, "token": self.token, "label": self.label}


def _library() -> Any:
    try:
        import pkcs11
    except ImportError:
        raise KeyProblem("a PKCS#11 signing key needs the python-pkcs11 package "
                         "(pip install 'weightmark[hsm]')") from None
    return pkcs11


def token_pin() -> str:
    pin = os.environ.get(PIN_ENV)
    if not pin:
        raise KeyProblem(f"set {PIN_ENV} to the token's user PIN (it is never taken from the command line)")
    return pin


class TokenSigningKey:
    """An Ed25519 private key held in a PKCS#11 token: `sign(message)` and `public_key()`.

    Each signature opens a session, logs in, signs with CKM_EDDSA and closes it again, so no
    session outlives a call (the tool signs a few messages per command).
    """

    def __init__(self, spec: TokenSpec, pin: str, create: bool = False) -> None:
        self.spec = spec
        self._pin = pin
        lib = _library()
        self._pkcs11 = lib
        try:
            self._token = lib.lib(spec.module).get_token(token_label=spec.token)
        except lib.exceptions.NoSuchToken:
            raise KeyProblem(f"{spec.module}: no token labelled {spec.token!r}") from None
        except (OSError, RuntimeError, lib.exceptions.PKCS11Error) as exc:
            raise KeyProblem(f"{spec.module}: cannot load the PKCS#11 module ({exc or type(exc).__name__})") from None
        self._public = self._find_or_create(create)

    def _session(self) -> Any:
        exc_types = self._pkcs11.exceptions
        try:
            return self._token.open(user_pin=self._pin, rw=True)
        except (exc_types.PinIncorrect, exc_types.PinInvalid, exc_types.PinLenRange):
            raise KeyProblem(f"token {self.spec.token!r}: wrong PIN (from {PIN_ENV})") from None
        except exc_types.PinLocked:
            raise KeyProblem(f"token {self.spec.token!r}: the user PIN is locked") from None
        except exc_types.PKCS11Error as exc:
            raise KeyProblem(f"token {self.spec.token!r}: cannot open a session ({type(exc).__name__})") from None

    def _find_or_create(self, create: bool) -> Ed25519PublicKey:
        lib = self._pkcs11
        with self._session() as session:
            try:
                pub = session.get_key(lib.ObjectClass.PUBLIC_KEY, lib.KeyType.EC_EDWARDS, label=self.spec.label)
                session.get_key(lib.ObjectClass.PRIVATE_KEY, lib.KeyType.EC_EDWARDS, label=self.spec.label)
            except lib.exceptions.NoSuchKey:
                if not create:
                    raise KeyProblem(f"token {self.spec.token!r}: no Ed25519 key pair labelled "
                                     f"{self.spec.label!r}") from None
                pub = self._generate(session)
            except lib.exceptions.MultipleObjectsReturned:
                raise KeyProblem(f"token {self.spec.token!r}: several keys are labelled {self.spec.label!r}; "
                                 "labels must name one key pair") from None
            return _ed25519_public(pub[lib.Attribute.EC_POINT], self.spec)

    def _generate(self, session: Any) -> Any:
        """A new Ed25519 key pair in the token: private key sensitive and never extractable."""
        from pkcs11.util.ec import encode_named_curve_parameters

        lib = self._pkcs11
        params = session.create_domain_parameters(
            lib.KeyType.EC_EDWARDS, {lib.Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
            local=True)
        pub, _ = params.generate_keypair(store=True, label=self.spec.label, private_template={
            lib.Attribute.SENSITIVE: True, lib.Attribute.EXTRACTABLE: False})
        return pub

    def public_key(self) -> Ed25519PublicKey:
        return self._public

    def sign(self, message: bytes) -> bytes:
        lib = self._pkcs11
        with self._session() as session:
            key = session.get_key(lib.ObjectClass.PRIVATE_KEY, lib.KeyType.EC_EDWARDS, label=self.spec.label)
            signature = key.sign(bytes(message), mechanism=lib.Mechanism.EDDSA)
        try:
            self._public.verify(signature, bytes(message))
        except InvalidSignature:  # the token signed with another key or another scheme
            raise KeyProblem(f"token {self.spec.token!r}: key {self.spec.label!r} returned a signature that "
                             "does not verify under its public key") from None
        return signature


def _ed25519_public(point: bytes, spec: TokenSpec) -> Ed25519PublicKey:
    """CKA_EC_POINT of an Ed25519 key: the 32 raw bytes, DER-wrapped in an OCTET STRING by most
    tokens (04 20 ...), bare by some."""
    raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
    if len(raw) != 32:
        raise KeyProblem(f"token {spec.token!r}: key {spec.label!r} is not an Ed25519 key "
                         f"(public point of {len(point)} bytes)")
    return Ed25519PublicKey.from_public_bytes(raw)


# A lab home whose signing key is in a token says so in signer.json (public facts only: where
# the key is and its key id); signer.next.json is a rotation to a token key in progress.
SIGNER_FILE = "signer.json"
NEXT_SIGNER_FILE = "signer.next.json"
SIGNER_FORMAT = "weightmark-signer"


def signer_document(spec: TokenSpec, key_id: str) -> bytes:
    import json

    doc = {"format": SIGNER_FORMAT, "version": 1, "pkcs11": spec.to_json(), "key_id": key_id}
    return (json.dumps(doc, indent=2) + "\n").encode()


def read_signer(path: Path) -> tuple[TokenSpec, str]:
    """The token key a signer file names, and the key id it must have."""
    from weightmark.bounded import loads_json, read_bounded
    from weightmark.errors import InputFileError

    try:
        doc = loads_json(read_bounded(path, 64 << 10, "signer file"), str(path), "signer file")
    except InputFileError as exc:
        raise KeyProblem(str(exc)) from None
    try:
        if doc["format"] != SIGNER_FORMAT or doc["version"] != 1:
            raise ValueError("format or version")
        where = doc["pkcs11"]
        spec = TokenSpec(*(str(where[k]) for k in ("module", "token", "label")))
        return spec, str(doc["key_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KeyProblem(f"{path}: not a weightmark signer file ({exc})") from None
