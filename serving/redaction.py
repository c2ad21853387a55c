"""Redaction of prompt and completion text before it is put on spans (`record_content: true`).

The default redactor masks what must never reach a trace store: e-mail addresses, phone numbers and
things that look like API keys or secrets (`sk-...`, `fl-...`, `ghp_...`, `AKIA...`, `Bearer ...`,
`password=...`, long random-looking tokens). It is a safety net, not a guarantee: turn
`record_content` on only where the trace store may hold customer text. A custom redactor is a
`str -> str` function named in settings as `gateway.redaction_hook: "my_pkg.module:function"`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from fleetlens.config import ConfigError

Redactor = Callable[[str], str]

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# +44 20 7946 0958, (555) 123-4567, 555-123-4567, +1.555.123.4567: 7+ digits with separators
_PHONE = re.compile(r"(?<![\w.])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w.])")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)(\s*[:=]\s*)(['\"]?)[^\s'\"]{4,}\3")
_BEARER = re.compile(r"(?i)\bBearer\s+[A-Za-z0-9._~+/=-]{8,}")
_KEY_PREFIXED = re.compile(
    r"\b(?:sk|pk|rk|fl|xox[abprs]|ghp|gho|ghs|github_pat|glpat|hf)[-_][A-Za-z0-9_-]{12,}|\bAKIA[0-9A-Z]{16}\b")
# long runs that mix letters and digits (hex digests, base64 keys): 32+ characters
_RANDOM_TOKEN = re.compile(r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b")


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    if _DATE.fullmatch(text):
        return text
    digits = sum(ch.isdigit() for ch in text)
    return "[PHONE]" if 7 <= digits <= 15 else text


def default_redactor(text: str) -> str:
    """Mask e-mail addresses, phone numbers and secret-looking tokens."""
    text = _BEARER.sub("Bearer [SECRET]", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}{m.group(2)}[SECRET]", text)
    text = _KEY_PREFIXED.sub("[SECRET]", text)
    text = _EMAIL.sub("[EMAIL]", text)
    text = _RANDOM_TOKEN.sub("[SECRET]", text)
    return _PHONE.sub(_phone, text)


def load_redactor(spec: str | None) -> Redactor:
    """The default redactor, or the `module:function` named by `spec`; ConfigError when it cannot be loaded."""
    if not spec:
        return default_redactor
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"gateway.redaction_hook: {spec!r} must be 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"gateway.redaction_hook: cannot import module {module_name!r}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ConfigError(f"gateway.redaction_hook: {module_name!r} has no function {attribute!r}")
    return function
