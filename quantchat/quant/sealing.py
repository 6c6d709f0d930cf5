"""Encrypted shards and a keyed manifest for quantized checkpoints (both optional).

Encryption at rest (``--encrypt-key-file``): each ``model-*.safetensors`` shard is stored as AES-256-GCM
in chunks of ``CHUNK_BYTES``: ``MAGIC`` (8 bytes), a random 8-byte nonce prefix, the chunk size
(4 bytes, little endian), then each chunk's ciphertext and 16-byte tag. Chunk ``i`` uses the nonce
``prefix + i`` (4 bytes, big endian) and authenticates ``MAGIC + file name + i + last`` as associated
data, so chunks cannot be reordered, dropped, cut off or moved to another file. A shard is decrypted
into memory at load (never to disk): the peak RSS grows by the largest shard.

Keyed manifest (``--sign-key-file``): ``manifest.json`` gets ``hmac_sha256``, an HMAC-SHA256 over the
canonical JSON of everything else in it (the sha256 and size of every file, which shards are encrypted).
With a sign key, a loader refuses an unsigned manifest or a wrong HMAC; without one it refuses a signed
manifest (it cannot check it). Unkeyed checkpoints load as before.

Keys: 32 bytes, in a file (64 hex digits, base64, or the raw bytes; ``quantchat deploy checkpoint-key``)
or in ``$QUANTCHAT_CHECKPOINT_KEY`` / ``$QUANTCHAT_CHECKPOINT_SIGN_KEY`` (hex or base64), or their
``*_FILE`` variables.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from quantchat import envs
from quantchat.errors import ModelLoadError, QuantchatError

MAGIC = b"QCENC\x00\x01\x00"
CHUNK_BYTES = 4 * 1024 * 1024
TAG = 16
CIPHER = "AES-256-GCM"
_HEAD = len(MAGIC) + 8 + 4


def parse_key(data: bytes, where: str) -> bytes:
    """A 32-byte key from a file's or variable's bytes: 64 hex digits, base64 of 32 bytes, or 32 raw bytes
    (binary: 32 printable characters are a password, not a key, and refused)."""
    if len(data) == 32 and not all(32 <= b < 127 for b in data):
        return bytes(data)
    text = data.strip()
    try:
        s = text.decode("ascii")
    except UnicodeDecodeError:
        s = ""
    if len(s) == 64:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    if s:
        try:
            k = base64.b64decode(s + "=" * (-len(s) % 4), altchars=b"-_" if ("-" in s or "_" in s) else None,
                                 validate=True)
            if len(k) == 32:
                return k
        except (binascii.Error, ValueError):
            pass
    raise QuantchatError(f"{where}: not a 256-bit key (want 64 hex digits, base64 of 32 bytes or 32 raw bytes; "
                         "make one with quantchat deploy checkpoint-key)")


def read_key(path: str | Path | None, var: str) -> bytes | None:
    """The key in ``path``, else in ``$var`` or the file ``$var_FILE``; None when none is given."""
    if path:
        try:
            return parse_key(Path(path).read_bytes(), str(path))
        except OSError as e:
            raise QuantchatError(f"{path}: cannot read the key ({e.strerror})") from None
    value = os.environ.get(var, "").strip()
    if value:
        return parse_key(value.encode("utf-8"), f"${var}")
    fname = envs.raw(f"{var}_FILE")
    return read_key(fname, var) if fname else None


@dataclass(frozen=True)
class CheckpointKeys:
    """The keys of one save or load: ``encrypt`` (AES-256-GCM shards), ``sign`` (HMAC of the manifest)."""

    encrypt: bytes | None = None
    sign: bytes | None = None

    @classmethod
    def from_files(cls, encrypt_file: str | None = None, sign_file: str | None = None) -> CheckpointKeys:
        """The named files, else the environment ($QUANTCHAT_CHECKPOINT_KEY[_FILE], ..._SIGN_KEY[_FILE])."""
        return cls(read_key(encrypt_file, "QUANTCHAT_CHECKPOINT_KEY"),
                   read_key(sign_file, "QUANTCHAT_CHECKPOINT_SIGN_KEY"))


def _aad(name: str, i: int, last: bool) -> bytes:
    return MAGIC + name.encode("utf-8") + i.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def encrypt_file(path: Path, key: bytes, chunk: int = CHUNK_BYTES) -> None:
    """Encrypt ``path`` in place (through a temp file in the same folder)."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes, prefix, name = AESGCM(key), os.urandom(8), path.name
    size = path.stat().st_size
    n = max(1, -(-size // chunk))
    if n >= 2**32:
        raise QuantchatError(f"{path}: too large to encrypt in {chunk}-byte chunks")
    tmp = path.with_name(path.name + ".enc-tmp")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(MAGIC + prefix + chunk.to_bytes(4, "little"))
        for i in range(n):
            block = src.read(chunk)
            dst.write(aes.encrypt(prefix + i.to_bytes(4, "big"), block, _aad(name, i, i == n - 1)))
    os.replace(tmp, path)


def is_encrypted(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def decrypt_file(path: Path, key: bytes) -> bytearray:
    """The plaintext of an encrypted shard (in memory); ModelLoadError on a wrong key or modified bytes."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aes, name = AESGCM(key), path.name
    with open(path, "rb", buffering=0) as f:
        head = f.read(_HEAD)
        if len(head) != _HEAD or head[:len(MAGIC)] != MAGIC:
            raise ModelLoadError(f"{path}: not an encrypted quantchat shard")
        prefix, chunk = head[len(MAGIC):len(MAGIC) + 8], int.from_bytes(head[-4:], "little")
        size = os.fstat(f.fileno()).st_size - _HEAD
        if chunk <= 0 or chunk > 1 << 30:
            raise ModelLoadError(f"{path}: corrupt encrypted shard (chunk size {chunk})")
        n = max(1, -(-size // (chunk + TAG)))
        out = bytearray()
        for i in range(n):
            block = f.read(chunk + TAG)
            try:
                out += aes.decrypt(prefix + i.to_bytes(4, "big"), block, _aad(name, i, i == n - 1))
            except (InvalidTag, ValueError):
                raise ModelLoadError(f"{path}: cannot decrypt (wrong checkpoint key, or the file was modified "
                                     "or truncated)") from None
    return out


def manifest_mac(manifest: dict, key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "hmac_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return hmac.new(key, canon, hashlib.sha256).hexdigest()


def check_manifest_mac(manifest: dict, key: bytes | None, where: Path) -> None:
    """Refuse a manifest whose HMAC is wrong or missing (with a key), or present (without one)."""
    mac = manifest.get("hmac_sha256")
    if key is None:
        if mac is not None:
            raise ModelLoadError(f"{where}: the manifest is signed; give its key (--checkpoint-sign-key-file or "
                                 "$QUANTCHAT_CHECKPOINT_SIGN_KEY) to check it")
        return
    if not isinstance(mac, str):
        raise ModelLoadError(f"{where}: the manifest is not signed, but a sign key was given (an unsigned or "
                             "replaced checkpoint): refused")
    if not hmac.compare_digest(mac.lower(), manifest_mac(manifest, key)):
        raise ModelLoadError(f"{where}: the manifest's HMAC does not match (modified, or another sign key): "
                             "refused")
