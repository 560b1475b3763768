"""The one place that scrubs secrets and signed URLs from text before it is logged or stored.

Every error message, log line and saved API response that could carry a token, a presigned
URL or credentials in a URL goes through these helpers:

* :func:`secret_value` turns a ``SecretStr`` / str / None into the plain value (or ``""``);
* :func:`scrub` replaces every occurrence of the given secrets in a string or a JSON value;
* :func:`scrub_configured` does that for every secret the settings hold (CLI errors, blocks);
* :func:`redact_url` drops query string, fragment and userinfo (presigned signatures, basic auth);
* :func:`mask_url_credentials` keeps a URL usable for reading but masks its userinfo and the
  values of credential-like query parameters (``X-Amz-Signature``, ``token``, ``sig``, ...), for
  stored parameters and the ``request:`` log line;
* :func:`one_line` squeezes a server's reason into one short line;
* :func:`check_base_url` validates an API base URL (http(s), a host, no credentials, no query).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Union
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import SecretStr

from speech.errors import InvalidRequest

REDACTED = "***"


def secret_value(value: Union[str, SecretStr, None]) -> str:
    """The plain text of a token given as ``SecretStr``, str or None (``""`` when absent)."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return (value or "").strip()


def scrub(value: Any, *secrets: str) -> Any:
    """A copy of a string or JSON value (dicts, lists) with every secret replaced by ``***``."""
    secrets = tuple(s for s in secrets if s)
    if not secrets:
        return value
    if isinstance(value, str):
        for s in secrets:
            value = value.replace(s, REDACTED)
        return value
    if isinstance(value, dict):
        return {scrub(k, *secrets): scrub(v, *secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, *secrets) for v in value]
    return value


def scrub_configured(text: str, extra: Iterable[str] = ()) -> str:
    """``text`` without any secret the settings hold (tokens and the S3 secret key)."""
    from speech.settings import get_settings

    return scrub(text, *get_settings().secret_values(), *extra)


def redact_url(source: str) -> str:
    """Drop query string, fragment and userinfo from http(s)/s3 URLs (presigned URLs carry
    credentials); anything else (a local path) is returned unchanged."""
    parts = urlsplit(source)
    if parts.scheme in ("http", "https", "s3"):
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    return source


# query keys that carry credentials: AWS SigV4/V2, GCS, Azure SAS, CloudFront, generic tokens
_SECRET_QUERY = re.compile(r"(signature|credential|security-token|token|secret|password|passwd|sig$|^sig|"
                           r"key-pair-id|api[-_]?key|^key$|auth|session)", re.IGNORECASE)


def mask_url_credentials(source: str) -> str:
    """An http(s)/s3 URL with its user-info and the values of credential-like query parameters
    replaced by ``***`` (other parameters kept); anything else unchanged."""
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https", "s3"):
        return source
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_IN_TEXT = re.compile(r"(?:https?|s3)://[^\s\"'<>]+")


def one_line(value: Any, limit: int = 300) -> str:
    """A value (text or JSON) as one line of at most ``limit`` characters, with the credentials
    of any URL in it (user-info, signed query parameters) masked: an upstream's error message
    may quote a presigned URL."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = " ".join(str(text).split())
    text = _URL_IN_TEXT.sub(lambda m: mask_url_credentials(m.group(0)), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_base_url(url: str, service: str, env_var: str, key_var: str) -> str:
    """``url`` stripped of a trailing slash if it is ``http(s)://host[:port][/path]`` without
    credentials, query or fragment; else an :class:`InvalidRequest` that never echoes them."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        shown = redact_url(url) if parts.scheme in ("http", "https") else (
            f"{parts.scheme}://{parts.hostname or ''}{parts.path}" if parts.scheme else "<not a URL>")
        raise InvalidRequest(f"invalid {service} URL {shown!r}: expected http(s)://host[:port][/path] ({env_var})")
    if parts.username or parts.password:
        raise InvalidRequest(f"{service} URL must not carry credentials; the key goes in {key_var}")
    return url
