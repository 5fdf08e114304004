"""SCRAM-SHA-512 credentials as Kafka's storage tool takes them, salted: the password itself
never appears on a command line (``/proc/<pid>/cmdline`` is readable by every local user)."""

from __future__ import annotations

import base64
import hashlib
import os

ITERATIONS = 8192


def salted_password(password: str, salt: bytes, iterations: int = ITERATIONS) -> bytes:
    """RFC 5802 ``SaltedPassword := Hi(Normalize(password), salt, i)``; Hi is PBKDF2 with
    HMAC-SHA-512 for SCRAM-SHA-512 (the UTF-8 bytes, as Kafka's ScramFormatter normalises)."""
    return hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)


def salted_credential(
    name: str, password: str, iterations: int = ITERATIONS, salt: bytes | None = None
) -> str:
    """``SCRAM-SHA-512=[name=..,iterations=..,salt="..",saltedpassword=".."]`` for
    ``kafka-storage format --add-scram``."""
    salt = salt if salt is not None else os.urandom(24)
    salted = salted_password(password, salt, iterations)
    return (
        f"SCRAM-SHA-512=[name={name},iterations={iterations},"
        f'salt="{base64.b64encode(salt).decode()}",'
        f'saltedpassword="{base64.b64encode(salted).decode()}"]'
    )
