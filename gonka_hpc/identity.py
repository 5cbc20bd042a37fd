"""ed25519 identities: one key per participant, client and validator.

Key files hold two lines, the account name and the raw 32-byte private key in hex, mode 0600,
written atomically. An account is
known on the network by its name; its public key (hex) is registered in genesis or by a
`participant_joined` record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from .errors import GonkaError, SignatureError
from .fileutil import atomic_write_bytes


@dataclass(frozen=True)
class Identity:
    """A named private key. `public_hex` is what others use to check our signatures."""

    name: str
    private_key: Ed25519PrivateKey

    @property
    def public_hex(self) -> str:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, message: bytes) -> str:
        return self.private_key.sign(message).hex()

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, name: str, seed: bytes) -> Identity:
        """A deterministic key (tests and golden vectors only)."""
        if len(seed) != 32:
            raise ValueError("ed25519 seed must be 32 bytes")
        return cls(name, Ed25519PrivateKey.from_private_bytes(seed))

    def save(self, path: Path) -> None:
        from cryptography.hazmat.primitives.serialization import (
            Encoding,
            NoEncryption,
            PrivateFormat,
        )

        raw = self.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        atomic_write_bytes(Path(path), f"{self.name}\n{raw.hex()}\n".encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> Identity:
        path = Path(path)
        try:
            mode = path.stat().st_mode & 0o777
            name, hexkey = path.read_text().split()
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(hexkey))
        except FileNotFoundError:
            raise GonkaError(f"{path}: key file not found") from None
        except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
            raise GonkaError(f"{path}: cannot read key file ({exc.__class__.__name__})") \
                from None
        except ValueError:
            raise GonkaError(f"{path}: not a gonka-hpc key file (expected name and hex key)") \
                from None
        if mode & 0o077:
            raise GonkaError(f"{path}: key file is readable by others (mode {mode:o}); "
                             f"run: chmod 600 {path}")
        return cls(name, key)


def load_or_create(path: Path, name: str) -> Identity:
    """The key at `path`, created (mode 0600) if it does not exist yet."""
    if Path(path).exists():
        ident = Identity.load(path)
        if ident.name != name:
            raise GonkaError(f"{path}: key belongs to '{ident.name}', expected '{name}'")
        return ident
    ident = Identity.generate(name)
    ident.save(path)
    return ident


def verify_signature(public_hex: str, message: bytes, signature_hex: str) -> None:
    """Raise SignatureError unless `signature_hex` is a valid signature of `message`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(
            bytes.fromhex(signature_hex), message)
    except (InvalidSignature, ValueError):
        raise SignatureError("signature does not verify") from None


def is_valid_signature(public_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        verify_signature(public_hex, message, signature_hex)
    except SignatureError:
        return False
    return True
