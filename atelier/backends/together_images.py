"""Together images (``together:black-forest-labs/FLUX.1-schnell``) through the official ``together`` client.

One call, ``images.generate`` (``POST /v1/images/generations``), answers synchronously with
``{"id", "model", "object": "list", "data": [{"index", "type": "b64_json", "b64_json"} | {"index", "type":
"url", "url"}]}``. atelier asks for base64 (``response_format``; the model option ``response_format: url``
asks for URLs instead, which are then downloaded at once, without credentials).

Arguments sent (Together's schema; ``options["input"]`` adds or overrides any): ``model``, ``prompt``,
``width`` / ``height`` (rounded to multiples of 16, FLUX's patch grid), ``n``, ``seed``, ``steps`` (model
option; schnell's default is 4), ``output_format`` (png), ``negative_prompt`` (Together takes one); for image
to image, ``image_url`` as a data URI (for the models that document an input image, e.g. FLUX Kontext). There
is no strength argument (``strength_sent`` is None). Style references may go as ``reference_images`` (data
URIs) when the model option ``send_references`` is true; most FLUX models ignore them, so it is off.
A seed is accepted; Together promises no determinism. Errors have OpenAI's shape (``{"error": {"message",
"type", "param", "code"}}``); a 4xx that names NSFW content or the safety checker is a moderation refusal.

Endpoint: the client reads ``TOGETHER_BASE_URL``; the key is ``TOGETHER_API_KEY``.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from atelier.backends.common import (
    BackendError,
    RemoteImage,
    RemoteRequest,
    Target,
    api_key,
    check_image,
    download,
    kind_of_status,
    refuse_mask,
    retry_after,
    scrub,
    sdk_call,
)
from atelier.backends.prices import estimate as estimate_usd

NAME = "together"
KEY_ENV = "TOGETHER_API_KEY"
TAKES_MASK = False  # no inpaint with a mask here (see the module docstring)
REFUSAL = re.compile(r"nsfw|safety|moderat|content polic", re.IGNORECASE)


def snap16(x: int) -> int:
    """``x`` rounded to a multiple of 16 (FLUX works on 16-pixel patches), at least 16."""
    return max(16, int(round(x / 16)) * 16)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def build_arguments(target: Target, req: RemoteRequest) -> tuple[dict, dict]:
    """(the arguments sent, the same with image bytes replaced by their size: what lineage records)."""
    opts = target.options
    args: dict[str, Any] = {"model": target.model, "prompt": req.prompt, "width": snap16(req.width),
                            "height": snap16(req.height), "n": req.n, "output_format": opts.get("output_format", "png"),
                            "response_format": opts.get("response_format", "base64")}
    if req.seed is not None:
        args["seed"] = req.seed
    if "steps" in opts:
        args["steps"] = int(opts["steps"])
    if req.negative:
        args["negative_prompt"] = req.negative
    recorded = dict(args)
    if req.init_image is not None:
        args["image_url"] = data_uri(req.init_image)
        recorded["image_url"] = f"<init image, {len(req.init_image)} bytes>"
    if req.references and opts.get("send_references"):
        args["reference_images"] = [data_uri(r) for r in req.references]
        recorded["reference_images"] = [f"<style reference, {len(r)} bytes>" for r in req.references]
    extra = dict(opts.get("input", {}))
    return args | extra, recorded | extra


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """Dollars ``req`` will cost (price table at the size that would be sent), before sending it."""
    usd, _ = estimate_usd(target.source, snap16(req.width), snap16(req.height))
    return None if usd is None else usd * req.n


def generate(target: Target, req: RemoteRequest) -> list[RemoteImage]:
    """One attempt at ``req`` (no retries here: the caller's ``RetryPolicy`` decides); see the module docstring."""
    import together

    # 1. Check inputs and build the request
    key = api_key(KEY_ENV, NAME)
    refuse_mask(req, NAME, target.model)
    model = target.model
    args, recorded = build_arguments(target, req)
    # 2. The client: our key, our timeout, no retries of its own (the caller's policy retries)
    client = together.Together(api_key=key, base_url=target.base_url or None, timeout=req.timeout, max_retries=0)
    # 3. Call
    def call() -> Any:
        with client:
            return client.images.generate(**args)

    resp = sdk_call(together, call, NAME, model, key, req.timeout, lambda exc: _status_error(exc, model, key))
    request_id = getattr(resp, "id", None) or None
    # 4. Decode (or download at once) every image
    if not getattr(resp, "data", None):
        raise BackendError(NAME, model, "malformed", "response has no images", request_id=request_id)
    width, height = args["width"], args["height"]
    usd, taken = estimate_usd(target.source, width, height)
    sent = {"arguments": recorded, "endpoint": "images.generate", "strength_sent": None,
            "style_references_sent": len(recorded.get("reference_images", []))}
    out = []
    for item in sorted(resp.data, key=lambda d: getattr(d, "index", 0)):
        if getattr(item, "b64_json", None):
            try:
                data = base64.b64decode(item.b64_json, validate=True)
            except ValueError:
                raise BackendError(NAME, model, "malformed", "b64_json is not base64", request_id=request_id) from None
            data = check_image(data, NAME, model, request_id)
        elif getattr(item, "url", None):
            data = download(item.url, NAME, model, req.timeout, request_id)
        else:
            raise BackendError(NAME, model, "malformed", "an image with neither b64_json nor url", request_id=request_id)
        out.append(RemoteImage(data, {
            "backend": NAME, "model": model, "version": None, "request_id": request_id, "params_sent": sent,
            "deterministic": False, "usd": usd, "price_table": taken, "size": [width, height]}))
    return out


def _status_error(exc: Any, model: str, key: str) -> BackendError:
    """A ``BackendError`` from a ``together.APIStatusError``: the provider's own message and code."""
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    code, message = str(err.get("code") or ""), str(err.get("message") or exc.message)
    status = exc.status_code
    kind = "refused" if 400 <= status < 500 and status not in (401, 403, 429) and REFUSAL.search(f"{code} {message}") \
        else kind_of_status(status)
    detail = scrub(f"HTTP {status}" + (f" {code}" if code else "") + f": {message}", key)
    headers = dict(exc.response.headers)
    return BackendError(NAME, model, kind, detail, retry_after=retry_after(headers),
                        request_id=headers.get("x-request-id") or None)
