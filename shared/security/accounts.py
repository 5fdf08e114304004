"""Accounts of RadStream's web app (the worklist): user name → role and argon2id password
hash, in a 0600 JSON file.

No password is ever stored or logged; verification costs the same whether or not the user
exists (a dummy hash is verified for unknown names), so timing does not reveal accounts.
``python -m shared.security.accounts add NAME --role clinician`` reads the password from stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

Role = Literal["clinician", "operator"]
ROLES: tuple[Role, ...] = ("clinician", "operator")
_HASHER = PasswordHasher()  # argon2id, the library's (RFC 9106 low-memory) defaults
_DUMMY = _HASHER.hash("radstream-no-such-user")


@dataclass(frozen=True)
class Account:
    name: str
    role: Role
    hash: str


class Users:
    def __init__(self, accounts: dict[str, Account]) -> None:
        self._accounts = accounts

    @classmethod
    def load(cls, path: Path) -> Users:
        raw = json.loads(path.read_text())
        accounts = {}
        for name, entry in raw.get("users", {}).items():
            role = entry["role"]
            if role not in ROLES:
                raise ValueError(f"users file: unknown role {role!r}")
            accounts[name] = Account(name, cast(Role, role), str(entry["hash"]))
        return cls(accounts)

    def verify(self, name: str, password: str) -> Account | None:
        """The account if ``password`` is right, else None (constant work either way)."""
        account = self._accounts.get(name)
        try:
            _HASHER.verify(account.hash if account else _DUMMY, password)
        except (VerificationError, InvalidHashError):
            return None
        return account

    def __len__(self) -> int:
        return len(self._accounts)


def add_user(path: Path, name: str, role: Role, password: str) -> None:
    """Add or replace one account (atomically, file 0600)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError("user name: 1 to 64 letters, digits, '-' or '_'")
    if len(password) < 12:
        raise ValueError("password: at least 12 characters")
    raw: dict[str, Any] = (
        json.loads(path.read_text()) if path.exists() else {"version": 1, "users": {}}
    )
    raw["users"][name] = {"role": role, "hash": _HASHER.hash(password)}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(raw, indent=2))
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.security.accounts")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add or replace an account; password on stdin")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument(
        "--file",
        type=Path,
        default=Path(".radstream/secrets/worklist-users.json"),
        help="the worklist users file (RADSTREAM_WORKLIST__USERS_FILE)",
    )
    args = parser.parse_args(argv)
    password = sys.stdin.readline().rstrip("\n")
    add_user(args.file, args.name, args.role, password)
    print(f"{args.name}: {args.role} account written to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
