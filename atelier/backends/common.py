"""What every remote backend shares: the request, the result, the one error type, retries, keys, downloads.

A backend is a module with ``generate(target, req, key, policy) -> list[RemoteImage]`` making *one* attempt
(no retries of its own: the official clients' retries are switched off so that one ``RetryPolicy`` governs
them all) and raising ``BackendError`` with a ``kind`` that says whether trying again can help.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# What each kind of failure means, and whether waiting and trying again can help.
RETRYABLE = {"rate-limited", "server", "connection"}
KINDS = {
    "rate-limited": "rate limited",
    "server": "server error",
    "connection": "could not connect",
    "timeout": "timed out",
    "refused": "refused by the provider's moderation",
    "bad-request": "bad request",
    "auth": "authentication failed",
    "expired": "result URL expired before it could be downloaded",
    "malformed": "malformed response",
    "failed": "generation failed",
    "config": "not configured",
    "budget": "stopped before the request",
}


class BackendError(RuntimeError):
    """A remote backend failed; ``str()`` is one line naming the backend, model and (when known) deliverable.

    ``kind`` is a key of ``KINDS``; only ``RETRYABLE`` kinds are retried. ``retry_after`` is the wait the
    provider asked for (seconds), when it said. The message never holds an API key: it is built from the
    provider's error text, which is scrubbed of the key before it gets here (``scrub``).
    """

    def __init__(self, backend: str, model: str, kind: str, detail: str = "", *, retry_after: float | None = None,
                 request_id: str | None = None, context: str = "") -> None:
        self.backend, self.model, self.kind, self.detail = backend, model, kind, " ".join(str(detail).split())
        self.retry_after, self.request_id, self.context = retry_after, request_id, context
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.backend}:{self.model}" + (f" for {self.context}" if self.context else "")
        tail = f": {self.detail}" if self.detail else ""
        rid = f" (request {self.request_id})" if self.request_id else ""
        return f"{where}: {KINDS.get(self.kind, self.kind)}{tail}{rid}"[:500]

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE

    def for_context(self, context: str) -> BackendError:
        """The same error, naming what it was made for (a deliverable, a stage)."""
        both = f"{context}, {self.context}" if self.context else context
        return BackendError(self.backend, self.model, self.kind, self.detail, retry_after=self.retry_after,
                            request_id=self.request_id, context=both)


@dataclass(frozen=True)
class Target:
    """Which backend and model a ``ModelSpec.source`` names, e.g. ``openai:gpt-image-1``.

    ``options`` are the backend's own settings (OpenAI ``quality``, a ComfyUI ``workflow`` path, ...).
    ``base_url`` overrides the backend's default endpoint (tests point it at a stand-in server); when
    empty, the official client's own setting applies (``OPENAI_BASE_URL``, ``REPLICATE_BASE_URL``).
    """

    backend: str
    model: str
    options: Mapping[str, Any] = field(default_factory=dict)
    base_url: str = ""

    @property
    def source(self) -> str:
        return f"{self.backend}:{self.model}"


@dataclass(frozen=True)
class RemoteRequest:
    """One generation: text to image, image to image when ``init_image`` (PNG bytes) is given, or an inpaint
    (an edit with a mask) when ``mask`` is given too."""

    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    seed: int | None = None
    n: int = 1
    init_image: bytes | None = None
    strength: float | None = None  # img2img: how much is regenerated, where the API takes it
    timeout: float = 120.0  # seconds for the whole generation, polling included
    references: tuple[bytes, ...] = ()  # style reference images, where the API takes extra input images
    mask: bytes | None = None  # inpaint: PNG, the init image's size, white = repaint, black = keep


@dataclass(frozen=True)
class RemoteImage:
    """One image as downloaded (bytes, never a URL: provider URLs expire) and what lineage records about it.

    ``facts``: backend, model, version (when the API reports one), request_id, params_sent (exactly what
    was sent, minus image bytes), deterministic (whether the backend promises the same image for the same
    request; a seed is not such a promise), usd (the price table's estimate) and price_table (its date).
    """

    data: bytes
    facts: dict

    @property
    def mime(self) -> str:
        return sniff_mime(self.data)

    def image(self) -> Any:  # PIL.Image.Image, RGB
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as im:
            return im.convert("RGB")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for rate limits, 5xx and dropped connections; everything else fails at once."""

    attempts: int = 4  # tries in all, the first included
    base_delay: float = 1.0  # seconds before the second try; doubles each time, with +-20% jitter
    max_delay: float = 60.0  # no single wait is longer, Retry-After included (a longer one fails instead)


def with_retries(call: Callable[[], Any], policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                 on_retry: Callable[[BackendError, float], None] | None = None) -> Any:
    """``call()``, tried again after a ``BackendError`` that can pass (429, 5xx, connection), up to the policy."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except BackendError as exc:
            if not exc.retryable or attempt == policy.attempts:
                raise
            if exc.retry_after is not None and exc.retry_after > policy.max_delay:
                raise  # the provider asks for a longer pause than we wait: say so now, not after it
            backoff = policy.base_delay * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)  # noqa: S311
            delay = min(policy.max_delay, exc.retry_after if exc.retry_after is not None else backoff)
            if on_retry:
                on_retry(exc, delay)
            sleep(delay)
    raise AssertionError("unreachable")


def sdk_call(sdk: Any, call: Callable[[], Any], backend: str, model: str, key: str, timeout: float,
             status_error: Callable[[Any], BackendError]) -> Any:
    """``call()`` through an official client generated from an OpenAPI spec (``openai``, ``together``: the same
    exception classes), its errors as ``BackendError``s with the key scrubbed; ``status_error`` reads the
    provider's own code and message out of an ``APIStatusError``."""
    try:
        return call()
    except sdk.APITimeoutError:  # before APIConnectionError, its base class
        raise BackendError(backend, model, "timeout", f"no response within {timeout:g} s") from None
    except sdk.APIConnectionError as exc:
        raise BackendError(backend, model, "connection", scrub(str(exc), key)) from None
    except sdk.APIStatusError as exc:
        raise status_error(exc) from None
    except sdk.APIResponseValidationError as exc:
        raise BackendError(backend, model, "malformed", scrub(str(exc), key)) from None
    except ValueError as exc:  # the client could not parse the body as JSON
        raise BackendError(backend, model, "malformed", scrub(str(exc), key)[:200]) from None


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a ``Retry-After`` (or ``retry-after-ms``) header asks for: a number or an HTTP date."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    if (ms := lower.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = (lower.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def kind_of_status(status: int) -> str:
    """The failure kind of an HTTP status with no more specific reading."""
    if status == 429:
        return "rate-limited"
    if status in (401, 403):
        return "auth"
    if status >= 500:
        return "server"
    return "bad-request"


# ------------------------------------------------------------------------------------------ keys
def api_key(env: str, backend: str) -> str:
    """The API key from ``env`` or from the file named in ``<env>_FILE``; never from a brief, never stored."""
    value = os.environ.get(env, "").strip()
    if not value and (path := os.environ.get(f"{env}_FILE", "").strip()):
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                value = f.read().strip()
        except OSError as exc:
            raise BackendError(backend, "*", "config",
                               f"{env}_FILE names {path}, which cannot be read ({exc.strerror})") from None
    if not value:
        raise BackendError(backend, "*", "config", f"set {env} (or {env}_FILE) to the API key")
    return value


def key_is_set(env: str) -> bool:
    return bool(os.environ.get(env, "").strip() or os.environ.get(f"{env}_FILE", "").strip())


def scrub(text: str, *secrets: str) -> str:
    """``text`` with every secret replaced: provider errors may echo a header or a URL back."""
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


# ------------------------------------------------------------------------------------------ bytes
def sniff_mime(data: bytes) -> str:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def check_image(data: bytes, backend: str, model: str, request_id: str | None = None) -> bytes:
    """``data`` if it decodes as an image, else a ``malformed`` error (a provider error page saved as a PNG)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as exc:  # noqa: BLE001 - any decoder error means "not an image"
        raise BackendError(backend, model, "malformed", f"result is not an image ({len(data)} bytes: {exc})",
                           request_id=request_id) from None
    return data


def download(url: str, backend: str, model: str, timeout: float, request_id: str | None = None) -> bytes:
    """The bytes behind a result URL, fetched at once and *without* credentials (the URL is another host's);
    a ``data:`` URL (base64) is decoded instead.

    403 / 404 / 410 mean the URL expired (providers keep results about an hour): that fails at once, as
    the image is gone; 429 / 5xx / dropped connections are retryable.
    """
    if url.startswith("data:"):
        import base64

        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=True)
        except (IndexError, ValueError):
            raise BackendError(backend, model, "malformed", "result data URI is not base64",
                               request_id=request_id) from None
        return check_image(data, backend, model, request_id)
    import httpx

    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as http:
            resp = http.get(url)
    except httpx.TimeoutException:
        raise BackendError(backend, model, "timeout", f"downloading the result took over {timeout:g} s",
                           request_id=request_id) from None
    except httpx.HTTPError as exc:
        raise BackendError(backend, model, "connection", f"downloading the result: {type(exc).__name__}",
                           request_id=request_id) from None
    if resp.status_code in (403, 404, 410):
        raise BackendError(backend, model, "expired", f"HTTP {resp.status_code} from the result URL",
                           request_id=request_id)
    if resp.status_code >= 400:
        raise BackendError(backend, model, kind_of_status(resp.status_code),
                           f"HTTP {resp.status_code} downloading the result", request_id=request_id,
                           retry_after=retry_after(resp.headers))
    return check_image(resp.content, backend, model, request_id)


def refuse_mask(req: RemoteRequest, backend: str, model: str) -> None:
    """A ``config`` error for a backend that takes no mask (before anything is sent)."""
    if req.mask is not None:
        raise BackendError(backend, model, "config", "this backend takes no inpaint mask; inpaint with an "
                           "openai, replicate or fal model that documents one")


def mask_as_alpha(mask_png: bytes) -> bytes:
    """OpenAI's mask convention from ours: a PNG whose *transparent* pixels (alpha 0) are to be edited, where
    ours is white; the colour channels are black. Same size as the mask."""
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(mask_png)) as m:
        keep = ImageOps.invert(m.convert("L").point(lambda v: 255 if v >= 128 else 0))  # 255 = keep (opaque)
    rgba = Image.new("RGBA", keep.size, (0, 0, 0, 255))
    rgba.putalpha(keep)
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    return buf.getvalue()


def cancel_quietly(job: Any) -> None:
    """Cancel a provider's job (a prediction, a queued request), best effort: the timeout is the error to report."""
    try:
        job.cancel()
    except Exception:  # noqa: BLE001
        pass


def nearest_size(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The supported size closest in aspect ratio (then in area) to ``width`` x ``height``."""
    import math

    aspect, area = math.log(width / height), width * height
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - aspect), 3), abs(s[0] * s[1] - area)))
