"""Gateway API keys: a store of *hashes* loaded from `keys.yaml`, and Bearer-header checking.

The secret key is shown once by `generate_key` and never stored: `keys.yaml` holds
`hash: sha256:<hex>`. A leaked `keys.yaml` (backups, a repo, a support ticket) therefore
gives nobody a working key.

Why a fast hash (SHA-256) and not bcrypt/argon2: slow hashes exist because passwords are
low-entropy, so an attacker holding the hash can guess them. Our keys are 256 random bits
(`secrets.token_urlsafe(32)`); guessing one from its SHA-256 is a 2**256 search whatever the
hash speed, so a slow hash would only add milliseconds to every request for no security.

`keys.yaml` is a list of entries::

    - id: acme-prod            # non-secret, appears in logs, traces and rate-limit state
      customer: acme
      hash: sha256:9f86d0...   # from `generate_key`
      feature: chat            # optional: feature for cost attribution if no header says one
      allowed_models: [llama-8b]   # optional: omitted = every model
      rpm: 600                 # optional requests/min; omitted = unlimited
      tpm: 200000              # optional tokens/min; omitted = unlimited
      disabled: false
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetlens.config import ConfigError, read_yaml_file
from . import errors

log = logging.getLogger(__name__)

HASH_SCHEME = "sha256"
FEATURE_HEADER = "X-FleetLens-Feature"
KEY_ENTROPY_BYTES = 32
MAX_KEY_LENGTH = 256
"""Longer presented keys are refused before hashing: no key we issue is near this long."""

_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_FEATURE_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
_PLAINTEXT_FIELDS = ("key", "api_key", "apikey", "secret", "token", "plaintext")


def hash_key(key: str) -> str:
    """The stored form of a key: `sha256:<hex>` of its UTF-8 bytes."""
    return f"{HASH_SCHEME}:{hashlib.sha256(key.encode('utf-8')).hexdigest()}"


def generate_key(prefix: str = "fl-") -> tuple[str, str]:
    """A new random key and its hash. Show the key to its owner once; store only the hash.

    The prefix lets secret scanners (GitHub, gitleaks) and humans recognise a FleetLens key.
    """
    key = prefix + secrets.token_urlsafe(KEY_ENTROPY_BYTES)
    return key, hash_key(key)


class ApiKey(BaseModel):
    """One `keys.yaml` entry. Holds no secret; the hash is still kept out of reprs and logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, description="Non-secret identifier used in logs and rate-limit state.")
    customer: str = Field(min_length=1)
    hash: str = Field(repr=False, description="`sha256:<64 hex>` of the key.")
    feature: str | None = None
    allowed_models: frozenset[str] | None = None
    rpm: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    disabled: bool = False

    @field_validator("hash", mode="before")
    @classmethod
    def _check_hash(cls, value: Any) -> str:
        # Never echo the value: a confused operator may have pasted the key itself here.
        if not isinstance(value, str) or not _HASH_RE.match(value.strip().lower()):
            raise ValueError(
                "must be 'sha256:<64 hex digits>' (the hash from generate_key, never the key itself)"
            )
        return value.strip().lower()

    def allows_model(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def resolve_feature(self, header_value: str | None) -> str | None:
        """The feature a request is attributed to: the header if valid, else the key's default.

        The header wins so one key can serve several features of the same customer; values are
        restricted to a short safe charset because they become warehouse labels.
        """
        if header_value is not None and _FEATURE_RE.match(header_value.strip()):
            return header_value.strip()
        return self.feature

    def __str__(self) -> str:
        return f"ApiKey(id={self.id!r}, customer={self.customer!r})"


class AuthFailure(StrEnum):
    """Why a request was not authenticated; each maps to one HTTP status and message."""

    MISSING_HEADER = "missing_header"
    WRONG_SCHEME = "wrong_scheme"
    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    DISABLED_KEY = "disabled_key"

    @property
    def status(self) -> int:
        return 403 if self is AuthFailure.DISABLED_KEY else 401

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    AuthFailure.MISSING_HEADER: (
        "You didn't provide an API key. Provide it in an Authorization header using Bearer auth "
        "(Authorization: Bearer YOUR_KEY)."
    ),
    AuthFailure.WRONG_SCHEME: (
        "The Authorization header must use the Bearer scheme (Authorization: Bearer YOUR_KEY)."
    ),
    AuthFailure.MALFORMED: (
        "The Authorization header is malformed: expected 'Bearer ' followed by one API key."
    ),
    AuthFailure.UNKNOWN_KEY: "Incorrect API key provided.",
    AuthFailure.DISABLED_KEY: "This API key has been disabled.",
}


class AuthError(Exception):
    """Authentication failed; `reason` is precise, the message never contains the key."""

    def __init__(self, reason: AuthFailure) -> None:
        super().__init__(reason.message)
        self.reason = reason

    @property
    def status(self) -> int:
        return self.reason.status

    def to_response(self) -> errors.ErrorResponse:
        """The OpenAI-shaped answer: 401 authentication_error or 403 permission_denied."""
        if self.reason is AuthFailure.DISABLED_KEY:
            return errors.permission_denied(self.reason.message, code="api_key_disabled")
        return errors.authentication_error(self.reason.message)


def parse_bearer(header_value: str | None) -> str:
    """The key from an `Authorization` header value; raises AuthError saying what is wrong.

    The scheme is matched case-insensitively (RFC 9110 §11.1); the token must be one word.
    """
    if header_value is None or not header_value.strip():
        raise AuthError(AuthFailure.MISSING_HEADER)
    scheme, *rest = header_value.split(None, 1)
    if scheme.lower() != "bearer":
        raise AuthError(AuthFailure.WRONG_SCHEME)
    token = rest[0].strip() if rest else ""
    if not token or any(c.isspace() for c in token):
        raise AuthError(AuthFailure.MALFORMED)
    return token


class KeyStore:
    """Known keys, looked up by hash.

    Timing: the dict lookup's time depends on the SHA-256 of the *presented* key, not on how
    many characters of a real key it matches. Learning "my digest shares a prefix with a stored
    digest" does not help build a key (that needs a preimage), so the lookup leaks nothing
    useful. The hit is still confirmed with `hmac.compare_digest` so correctness never rests on
    the dict's string comparison.
    """

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        for key in keys:
            if key.id in self._by_id:
                raise ConfigError(f"API keys: duplicate id {key.id!r}")
            if key.hash in self._by_hash:
                raise ConfigError(
                    f"API keys: {key.id!r} and {self._by_hash[key.hash].id!r} have the same hash "
                    "(one key, two entries)"
                )
            self._by_hash[key.hash] = key
            self._by_id[key.id] = key

    @classmethod
    def from_entries(cls, entries: Any, *, source: str = "keys") -> KeyStore:
        """Validate parsed YAML; errors name the entry and field but never echo values."""
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise ConfigError(f"{source}: expected a list of key entries, got {type(entries).__name__}")
        keys, problems = [], []
        for index, entry in enumerate(entries):
            label = f"{source}[{index}]"
            if not isinstance(entry, Mapping):
                problems.append(f"  {label}: expected a mapping with id, customer, hash")
                continue
            if isinstance(entry.get("id"), str):
                label += f" (id {entry['id']!r})"
            plaintext = [name for name in _PLAINTEXT_FIELDS if name in entry]
            if plaintext:
                problems.append(
                    f"  {label}: field {plaintext[0]!r} looks like a plaintext API key; keys.yaml must hold "
                    "only 'hash: sha256:<hex>' (see fleetlens.serving.keys.generate_key). "
                    "Remove it and rotate that key."
                )
                continue
            try:
                keys.append(ApiKey.model_validate(dict(entry)))
            except ValidationError as error:
                for item in error.errors():
                    field = ".".join(str(part) for part in item["loc"]) or "<entry>"
                    message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
                    problems.append(f"  {label}.{field}: {message}")
        if problems:
            raise ConfigError(f"invalid API keys in {source}:\n" + "\n".join(problems))
        return cls(keys)

    @classmethod
    def from_yaml(cls, path: str | Path) -> KeyStore:
        return cls.from_entries(read_yaml_file(path, "API keys file"), source=str(path))

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        return f"KeyStore({len(self)} keys)"

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def limited_ids(self) -> list[str]:
        """Ids of the keys with a requests/min or tokens/min limit."""
        return sorted(key.id for key in self._by_id.values() if key.rpm or key.tpm)

    def replace_with(self, other: KeyStore) -> None:
        """Take `other`'s keys (a reload): one assignment per map, so a lookup sees old or new keys."""
        self._by_hash, self._by_id = other._by_hash, other._by_id

    def authenticate(self, presented_key: str) -> ApiKey | None:
        """The entry for this key (disabled ones included: the caller decides), or None."""
        if not presented_key or len(presented_key) > MAX_KEY_LENGTH:
            return None
        digest = hash_key(presented_key)
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.hash.encode(), digest.encode()):
            return None
        return entry

    def check_authorization(self, header_value: str | None) -> ApiKey:
        """The enabled key named by an `Authorization` header; raises AuthError (401/403) otherwise."""
        entry = self.authenticate(parse_bearer(header_value))
        if entry is None:
            raise AuthError(AuthFailure.UNKNOWN_KEY)
        if entry.disabled:
            raise AuthError(AuthFailure.DISABLED_KEY)
        return entry


class KeysWatcher:
    """Poll-based reload of keys.yaml, for revoking and adding keys without a restart.

    `check()` stats the file; when (mtime, size, inode) changed it hashes the content, and when the
    content changed it parses it. A good file replaces the keys *inside* `store` (so everything
    holding the store — the gateway, the limiter's limits — sees the new keys at once); a bad one
    is logged with the parser's message, kept in `last_error`, and the previous keys stay in service.
    """

    def __init__(self, path: str | Path, store: KeyStore,
                 validate: Callable[[KeyStore], None] | None = None) -> None:
        self.path = Path(path)
        self.store = store
        self.validate = validate  # raises ConfigError for keys this gateway cannot serve as configured
        self.last_error: str | None = None
        self.reloads = 0
        self._stat = self._stat_now()
        self._sha = self._digest()
        self._failed_sha: str | None = None

    def _stat_now(self) -> Any:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the file changed; True when new keys are now in service."""
        stat = self._stat_now()
        if stat == self._stat:
            return False
        self._stat = stat
        sha = self._digest()
        if sha is not None and sha == self._sha:
            self.last_error = None  # touched or reverted
            return False
        if sha is not None and sha == self._failed_sha:
            return False  # already reported
        try:
            fresh = KeyStore.from_yaml(self.path)
            if self.validate is not None:
                self.validate(fresh)
        except ConfigError as error:
            self._failed_sha = sha
            self.last_error = str(error)
            log.error("API keys not reloaded, the previous %d keys stay in service: %s", len(self.store), error)
            return False
        self.store.replace_with(fresh)
        self._sha, self._failed_sha, self.last_error = sha, None, None
        self.reloads += 1
        log.info("API keys reloaded from %s (%d keys)", self.path, len(self.store))
        return True
