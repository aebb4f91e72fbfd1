"""Cloud credentials, following Triton's own rules.

Triton reads credentials from the standard environment variables, or from the
JSON file named by ``TRITON_CLOUD_CREDENTIAL_PATH``. In that file each cloud
("s3", "gs", "as") maps credential names to credentials; the name that is the
longest prefix of the repository path wins and ``""`` is the fallback. A user
who already runs Triton on a bucket therefore changes nothing for cacheagent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cacheagent.errors import InvalidParameterError

CREDENTIAL_FILE_ENV = "TRITON_CLOUD_CREDENTIAL_PATH"


def longest_prefix_match(names: list[str], url: str) -> str | None:
    """Return the longest of ``names`` that prefixes ``url`` (``""`` prefixes everything)."""
    matching = [name for name in names if isinstance(name, str) and url.startswith(name)]
    return max(matching, key=len) if matching else None


def credentials_from_file(cloud: str, url: str, env: Mapping[str, str]) -> Any | None:
    """Return the credential entry for ``url`` from TRITON_CLOUD_CREDENTIAL_PATH, or None.

    None means the file is not configured, or it holds no entry that applies,
    in which case the environment variables are used, as Triton does.
    """
    path = env.get(CREDENTIAL_FILE_ENV)
    if not path:
        return None
    table = _load_credential_file(Path(path)).get(cloud)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV}={path}: the '{cloud}' entry must be an object mapping "
            'credential names (path prefixes, or "" for the default) to credentials'
        )
    name = longest_prefix_match(list(table), url)
    if name is None:
        return None
    entry = table[name]
    _check_entry(cloud, name, entry, path)
    return entry


# The fields of each cloud's entry (Triton's format); every value is a string.
_FIELDS = {
    "s3": ("key_id", "secret_key", "session_token", "region", "profile"),
    "as": ("account_str", "account_key"),
}


def _check_entry(cloud: str, name: str, entry: Any, path: str) -> None:
    """Refuse an entry Triton would not accept, naming it (never its values: secrets)."""
    where = f"{CREDENTIAL_FILE_ENV}={path}: the '{cloud}' credential {name!r}"
    if cloud == "gs":
        # A path to a service account key file, or the key file's content itself.
        if not isinstance(entry, (str, dict)):
            raise InvalidParameterError(
                f"{where} must be the path of a service account key file (a string), "
                f"not {_kind(entry)}"
            )
        return
    fields = _FIELDS[cloud]
    if not isinstance(entry, dict):
        raise InvalidParameterError(
            f"{where} must be an object with the fields {', '.join(fields)}, not {_kind(entry)}; "
            "see Triton's 'Cloud Storage with Credential file' documentation"
        )
    for field in fields:
        value = entry.get(field)
        if value is not None and not isinstance(value, str):
            raise InvalidParameterError(
                f'{where} has "{field}" as {_kind(value)}; it must be a string: quote it'
            )


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else "an object"


def _load_credential_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV} names {path}, which does not exist; "
            "fix the path or unset the variable"
        ) from exc
    except (OSError, ValueError) as exc:
        # Only the position is quoted: the file holds secrets. The chained cause keeps
        # the file's text too (a JSON error's doc, a decode error's bytes): drop it.
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        if isinstance(exc, json.JSONDecodeError):
            exc.doc = ""
        elif isinstance(exc, UnicodeDecodeError):
            exc.object = b""
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV}: cannot read {path} as JSON{where}; "
            "see Triton's 'Cloud Storage with Credential file' documentation for the format"
        ) from exc
    if not isinstance(data, dict):
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV}: {path} must hold a JSON object with keys 's3', 'gs', 'as'"
        )
    return data
