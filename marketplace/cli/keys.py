"""Where every `strata` command gets its private key: never from its own command line, which other users of the
machine can read (``ps``) and shells keep in their history.

In order of precedence:

1. ``--key-file PATH``: a file holding the hex key (``0x`` optional, surrounding whitespace ignored). It is refused
   (``key_file_permissions``) unless only its owner may read it: mode 0600 or stricter, as ssh treats its keys.
2. ``--keystore PATH``: an encrypted keystore JSON (Ethereum's "Web3 Secret Storage", what
   ``eth_account.Account.encrypt`` and geth write). Its password comes from ``STRATA_KEYSTORE_PASSWORD``, or, when
   stdin is a terminal, from a prompt that does not echo.
3. The role's environment variable: ``CLIENT_KEY``, ``PROVIDER_KEY``, ``GATEWAY_KEY``, ``DEPLOYER_KEY`` (read
   through each command's settings class, with ``.env``).

Giving both ``--key-file`` and ``--keystore`` is a usage error: which key signs must never be a guess.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from eth_account import Account
from eth_account.signers.local import LocalAccount
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from marketplace.cli.common import EXIT_USAGE, fail, parse_key

KEYSTORE_PASSWORD_ENV = "STRATA_KEYSTORE_PASSWORD"

KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="a file holding the hex private key, readable by its owner only (chmod 600)",
        dir_okay=False,
    ),
]
KeystoreOption = Annotated[
    Path | None,
    typer.Option(
        "--keystore",
        help=f"an encrypted keystore JSON; its password from {KEYSTORE_PASSWORD_ENV}, else a prompt",
        dir_okay=False,
    ),
]


class KeystoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    strata_keystore_password: SecretStr | None = Field(
        default=None, description="decrypts the keystore given with --keystore"
    )


def load_account(
    *,
    key_file: Path | None,
    keystore: Path | None,
    env_key: SecretStr | None,
    env_name: str,
    as_json: bool = False,
) -> LocalAccount | None:
    """The account a command signs with, from the first source given (see the module's docstring); None when
    there is none, for the caller to say what it needs."""
    if key_file is not None and keystore is not None:
        usage("give --key-file or --keystore, not both")
    if key_file is not None:
        return _from_key_file(key_file, as_json)
    if keystore is not None:
        return _from_keystore(keystore, as_json)
    if env_key is not None:
        return _parsed(env_key.get_secret_value(), env_name)
    return None


def require_account(
    *,
    key_file: Path | None,
    keystore: Path | None,
    env_key: SecretStr | None,
    env_name: str,
    role: str,
    as_json: bool = False,
) -> LocalAccount:
    """:func:`load_account`, failing with ``missing_key`` when no source is given."""
    account = load_account(
        key_file=key_file, keystore=keystore, env_key=env_key, env_name=env_name, as_json=as_json
    )
    if account is None:
        fail(missing_key_message(role, env_name), "missing_key", as_json=as_json)
    return account


def missing_key_message(role: str, env_name: str) -> str:
    return f"no {role} key: pass --key-file or --keystore, or set {env_name}"


def usage(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _from_key_file(path: Path, as_json: bool) -> LocalAccount:
    try:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            fail(
                f"{path} may be read by others (mode {stat.S_IMODE(mode):04o}): a key file must be 0600 or "
                f"stricter; run `chmod 600 {path}`",
                "key_file_permissions",
                as_json=as_json,
            )
        text = path.read_text()
    except OSError as exc:
        fail(
            f"cannot read the key file {path}: {exc.strerror or exc}", "key_file_unreadable", as_json=as_json
        )
    return _parsed(text.strip(), str(path))


def _from_keystore(path: Path, as_json: bool) -> LocalAccount:
    try:
        document: Any = json.loads(path.read_text())
    except OSError as exc:
        fail(
            f"cannot read the keystore {path}: {exc.strerror or exc}", "keystore_unreadable", as_json=as_json
        )
    except json.JSONDecodeError as exc:
        fail(f"{path} is not a keystore (not JSON: {exc})", "keystore_invalid", as_json=as_json)
    password = KeystoreSettings().strata_keystore_password
    if password is not None:
        secret = password.get_secret_value()
    elif sys.stdin.isatty():
        secret = typer.prompt(f"Password for {path}", hide_input=True)
    else:
        fail(
            f"the keystore {path} needs a password: set {KEYSTORE_PASSWORD_ENV} (no terminal to ask on)",
            "keystore_password_missing",
            as_json=as_json,
        )
    try:
        raw = Account.decrypt(document, secret)
    except ValueError as exc:  # a wrong password (MAC mismatch) or a malformed keystore
        fail(f"cannot decrypt the keystore {path}: {exc}", "keystore_invalid", as_json=as_json)
    except (KeyError, TypeError) as exc:
        fail(f"{path} is not a keystore: {exc}", "keystore_invalid", as_json=as_json)
    account: LocalAccount = Account.from_key(raw)
    return account


def _parsed(text: str, source: str) -> LocalAccount:
    """A usage error (exit 2) names the source and why, never the text: it may be a key nearly right."""
    try:
        return parse_key(text)
    except typer.BadParameter as exc:
        raise typer.BadParameter(f"{source}: {exc.message}") from None
