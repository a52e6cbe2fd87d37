"""OpenAI images (``openai:gpt-image-1``, ``openai:dall-e-3``) through the official ``openai`` client.

Text to image is ``images.generate``; image to image (refine) is ``images.edit`` with the draft as the
input image; inpaint is ``images.edit`` with the image and a mask (OpenAI's convention: the mask's
*transparent* pixels are edited, so atelier's white-is-repaint mask is sent as alpha; the API may still
change pixels outside it, which the inpaint stage puts back). Results come back as base64 (``b64_json``:
GPT image models always, DALL-E when asked); a URL result is downloaded at once. What the API cannot do,
and how atelier says so in ``params_sent``:
- no seed: ``seed_sent`` is None and the backend promises no determinism;
- no negative prompt: it is appended to the prompt as ``Avoid: ...`` (and recorded so);
- no img2img strength: an edit regenerates as the model sees fit (``strength_sent`` is None);
- no IP-Adapter: style references go to ``images.edit`` as extra input images after the draft, and the
  prompt says so (``style_references_sent`` counts them);
- fixed sizes: the size closest in aspect is sent, and the image comes back at that size.
"""

from __future__ import annotations

import base64
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
    mask_as_alpha,
    nearest_size,
    retry_after,
    scrub,
    sdk_call,
)
from atelier.backends.prices import estimate as estimate_usd

NAME = "openai"
KEY_ENV = "OPENAI_API_KEY"
TAKES_MASK = True  # inpaint: an edit with a mask (see the module docstring)
SIZES = {
    "gpt-image": [(1024, 1024), (1536, 1024), (1024, 1536)],
    "dall-e-3": [(1024, 1024), (1792, 1024), (1024, 1792)],
    "dall-e-2": [(256, 256), (512, 512), (1024, 1024)],
}
REFUSAL_CODES = {"moderation_blocked", "content_policy_violation", "content_filter"}


def sizes_for(model: str) -> list[tuple[int, int]]:
    return next((s for prefix, s in SIZES.items() if model.startswith(prefix)), SIZES["gpt-image"])


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """Dollars ``req`` will cost (price table, at the size and quality that would be sent), before sending it."""
    width, height = nearest_size(req.width, req.height, sizes_for(target.model))
    usd, _ = estimate_usd(target.source, width, height, str(target.options.get("quality", "")) or "medium")
    return None if usd is None else usd * req.n


def generate(target: Target, req: RemoteRequest) -> list[RemoteImage]:
    """One attempt at ``req`` (no retries here: the caller's ``RetryPolicy`` decides); see the module docstring."""
    import openai

    # 1. Check inputs and build the request
    key = api_key(KEY_ENV, NAME)
    model = target.model
    width, height = nearest_size(req.width, req.height, sizes_for(model))
    quality = str(target.options.get("quality", "")) or None
    prompt = req.prompt + (f"\nAvoid: {req.negative}" if req.negative else "")
    if req.mask is not None and req.init_image is None:
        raise BackendError(NAME, model, "config", "an inpaint mask needs the image it applies to")
    refs = req.references if req.init_image is not None else ()
    if refs:
        first, what = ("the image to edit inside the mask", "image") if req.mask is not None else ("the draft to refine", "draft")
        prompt += (f"\nThe first image is {first}; the other {len(refs)} are style references: "
                   f"keep the {what}'s composition and match the references' style.")
    params: dict[str, Any] = {"model": model, "prompt": prompt, "n": req.n, "size": f"{width}x{height}"}
    if quality:
        params["quality"] = quality
    if model.startswith("dall-e"):
        params["response_format"] = "b64_json"
    elif fmt := target.options.get("output_format"):
        params["output_format"] = fmt
    if moderation := target.options.get("moderation"):
        params["moderation"] = moderation
    # 2. The client: our key, our timeout, no retries of its own (the caller's policy retries)
    client = openai.OpenAI(api_key=key, base_url=target.base_url or None, timeout=req.timeout, max_retries=0)
    # 3. Call: generate, or edit the init image
    def call() -> Any:
        with client:
            if req.init_image is None:
                return client.images.generate(**params)
            images = [("init.png", req.init_image, "image/png")]
            images += [(f"style-ref-{i}.png", r, "image/png") for i, r in enumerate(refs)]
            mask = {"mask": ("mask.png", mask_as_alpha(req.mask), "image/png")} if req.mask is not None else {}
            return client.images.edit(image=images if refs else images[0], **mask, **params)

    resp = sdk_call(openai, call, NAME, model, key, req.timeout, lambda exc: _status_error(exc, model, key))
    request_id = getattr(resp, "_request_id", None)
    # 4. Decode (or download at once) every image
    if not getattr(resp, "data", None):
        raise BackendError(NAME, model, "malformed", "response has no images", request_id=request_id)
    sent = {k: v for k, v in params.items() if k != "prompt"} | {
        "prompt": prompt, "endpoint": "images.edit" if req.init_image is not None else "images.generate",
        "seed_sent": None, "strength_sent": None, "negative_folded_into_prompt": bool(req.negative),
        "style_references_sent": len(refs), "mask_sent": req.mask is not None}
    usd, taken = estimate_usd(target.source, width, height, quality or "medium")
    out = []
    for item in resp.data:
        if item.b64_json:
            try:
                data = base64.b64decode(item.b64_json, validate=True)
            except ValueError:
                raise BackendError(NAME, model, "malformed", "b64_json is not base64", request_id=request_id) from None
            data = check_image(data, NAME, model, request_id)
        elif item.url:
            data = download(item.url, NAME, model, req.timeout, request_id)
        else:
            raise BackendError(NAME, model, "malformed", "an image with neither b64_json nor url", request_id=request_id)
        facts = {"backend": NAME, "model": model, "version": None, "request_id": request_id, "params_sent": sent,
                 "deterministic": False, "usd": usd, "price_table": taken, "size": [width, height]}
        if getattr(item, "revised_prompt", None):
            facts["revised_prompt"] = item.revised_prompt
        out.append(RemoteImage(data, facts))
    return out


def _status_error(exc: Any, model: str, key: str) -> BackendError:
    """A ``BackendError`` from an ``openai.APIStatusError``: the provider's own message, its code, its request id."""
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error", body) if isinstance(body.get("error", body), dict) else {}
    code, message = str(err.get("code") or ""), str(err.get("message") or exc.message)
    kind = "refused" if code in REFUSAL_CODES else kind_of_status(exc.status_code)
    detail = scrub(f"HTTP {exc.status_code}" + (f" {code}" if code else "") + f": {message}", key)
    return BackendError(NAME, model, kind, detail, retry_after=retry_after(dict(exc.response.headers)),
                        request_id=exc.request_id)
