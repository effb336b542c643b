"""API key secrets: `sp_<env>_<random><checksum>`, checked in-process, stored only as HMACs.

The random part is 27 base62 characters (≥ 160 bits). The last 6 characters are a base62
CRC32 of everything before them, so a mistyped or made-up key is rejected without a storage
lookup: a flood of random keys costs the store nothing. At rest only an HMAC-SHA-256 of
the key (keyed with a server secret) is kept, so a leaked database does not leak keys and
cannot be brute-forced offline without the server secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARS = 27  # 62**27 > 2**160
CHECKSUM_CHARS = 6  # 62**6 > 2**32
_KEY = re.compile(rf"sp_([a-z0-9]{{1,8}})_([0-9A-Za-z]{{{RANDOM_CHARS + CHECKSUM_CHARS}}})")
DISPLAY_PREFIX_CHARS = 12
MIN_KEY_SECRET_BYTES = 16


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 62)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_CHARS)


def generate_key(env: str) -> str:
    body = f"sp_{env}_" + "".join(secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS))
    return body + _checksum(body)


def well_formed(key: str) -> bool:
    """Shape and checksum only; constant work, no I/O."""
    if len(key) > 64 or _KEY.fullmatch(key) is None:
        return False
    body, checksum = key[:-CHECKSUM_CHARS], key[-CHECKSUM_CHARS:]
    return hmac.compare_digest(_checksum(body), checksum)


class KeyHasher:
    """HMAC-SHA-256 with the server secret: the only form of a key that is ever stored."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_KEY_SECRET_BYTES:
            raise ValueError(f"a key hashing secret needs {MIN_KEY_SECRET_BYTES} bytes or more")
        self._secret = secret

    def hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode("ascii"), hashlib.sha256).hexdigest()


def display_parts(key: str) -> tuple[str, str]:
    """What may be shown later: the prefix (env and first characters) and the last four."""
    return key[:DISPLAY_PREFIX_CHARS], key[-4:]
