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
    return None if name is None else table[name]


def _load_credential_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV} names {path}, which does not exist; "
            "fix the path or unset the variable"
        ) from None
    except (OSError, ValueError) as exc:
        # The message of a JSON error can quote file content (secrets): keep only its position.
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV}: cannot read {path} as JSON{where}; "
            "see Triton's 'Cloud Storage with Credential file' documentation for the format"
        ) from None
    if not isinstance(data, dict):
        raise InvalidParameterError(
            f"{CREDENTIAL_FILE_ENV}: {path} must hold a JSON object with keys 's3', 'gs', 'as'"
        )
    return data
