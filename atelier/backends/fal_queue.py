"""fal (``fal:fal-ai/flux/schnell``, ``fal:fal-ai/flux/dev/image-to-image``) through the official ``fal-client``,
on fal's queue: ``submit`` returns a request id and status / response / cancel URLs; the status is polled
(IN_QUEUE, IN_PROGRESS, COMPLETED) until the timeout, then the request is cancelled; the result's image URLs
are downloaded at once, without credentials.

Arguments sent (FLUX's schema on fal; ``options["input"]`` adds or overrides any): ``prompt``,
``image_size`` as ``{"width", "height"}``, ``num_images``, ``seed``, ``output_format``,
``enable_safety_checker``; for image to image, ``image_url`` (a data URI) and ``strength``. FLUX takes no
negative prompt: it is sent only when ``options["negative_input"]`` names the argument that takes one.
fal's safety checker does not fail a request: it flags images in ``has_nsfw_concepts`` (and blanks them);
a flagged image is a refusal here. A seed is accepted; no determinism is promised.
Inpaint (an inpainting endpoint such as ``fal-ai/flux-lora/inpainting`` or ``fal-ai/flux-pro/v1/fill``): the
image and the mask (white = repaint) as data URIs in ``image_url`` and ``options["mask_input"]`` (default
``mask_url``), with the strength; no ``image_size`` is sent, as the output follows the image.

Endpoint: fal-client reads ``FAL_QUEUE_RUN_HOST`` (and ``FAL_RUN_HOST``) when it is first imported, and
always speaks HTTPS. The key is ``FAL_KEY``.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from atelier.backends.common import (
    BackendError,
    RemoteImage,
    RemoteRequest,
    Target,
    api_key,
    cancel_quietly,
    download,
    kind_of_status,
    retry_after,
    scrub,
)
from atelier.backends.prices import estimate as estimate_usd

NAME = "fal"
KEY_ENV = "FAL_KEY"
TAKES_MASK = True  # inpaint: an edit with a mask (see the module docstring)
REFUSAL_TYPES = {"content_policy_violation"}


def build_arguments(target: Target, req: RemoteRequest) -> tuple[dict, dict]:
    """(the arguments sent, the same with image bytes replaced by their size: what lineage records)."""
    opts = target.options
    args: dict[str, Any] = {"prompt": req.prompt, "num_images": req.n, "output_format": opts.get("output_format", "png"),
                            "enable_safety_checker": True}
    if req.mask is None:
        args["image_size"] = {"width": req.width, "height": req.height}
    if req.seed is not None:
        args["seed"] = req.seed
    if req.negative and opts.get("negative_input"):
        args[opts["negative_input"]] = req.negative
    recorded = dict(args)
    if req.init_image is not None:
        args["image_url"] = "data:image/png;base64," + base64.b64encode(req.init_image).decode()
        recorded["image_url"] = f"<init image, {len(req.init_image)} bytes>"
        if req.strength is not None:  # img2img and fal's inpainting endpoints take it (FLUX Fill ignores it)
            args["strength"] = recorded["strength"] = req.strength
    if req.mask is not None:
        if req.init_image is None:
            raise BackendError(NAME, target.model, "config", "an inpaint mask needs the image it applies to")
        mask_key = opts.get("mask_input", "mask_url")
        args[mask_key] = "data:image/png;base64," + base64.b64encode(req.mask).decode()
        recorded[mask_key] = f"<mask, {len(req.mask)} bytes>"
    extra = dict(opts.get("input", {}))
    return args | extra, recorded | extra


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """Dollars ``req`` will cost (price table at the requested size), before sending it."""
    usd, _ = estimate_usd(target.source, req.width, req.height)
    return None if usd is None else usd * req.n


def generate(target: Target, req: RemoteRequest) -> list[RemoteImage]:
    """One attempt at ``req`` (no retries here: the caller's ``RetryPolicy`` decides); see the module docstring."""
    import httpx
    from fal_client.client import Completed, FalClientHTTPError, Queued, SyncClient

    # 1. Check inputs and build the request
    key = api_key(KEY_ENV, NAME)
    app = target.model
    args, recorded = build_arguments(target, req)
    deadline = time.monotonic() + req.timeout
    client = SyncClient(key=key, default_timeout=req.timeout)
    request_id = None
    try:
        # 2. Queue it (a server-side start timeout also stops the client retrying timeouts on its own)
        handle = client.submit(app, args, start_timeout=req.timeout if req.timeout > 1 else None)
        request_id = handle.request_id
        # 3. Poll until done or past the timeout (then cancel: nobody will collect it)
        while not isinstance(status := handle.status(), Completed):
            if time.monotonic() > deadline:
                cancel_quietly(handle)
                where = "in queue" if isinstance(status, Queued) else "in progress"
                raise BackendError(NAME, app, "timeout", f"request still {where} after {req.timeout:g} s",
                                   request_id=request_id)
            time.sleep(float(target.options.get("poll_interval", 0.25)))
        if status.error:
            kind = "refused" if status.error_type in REFUSAL_TYPES else "failed"
            raise BackendError(NAME, app, kind, scrub(f"{status.error_type or 'error'}: {status.error}", key),
                               request_id=request_id)
        result = handle.get()
    except httpx.TimeoutException:
        raise BackendError(NAME, app, "timeout", f"no response within {req.timeout:g} s", request_id=request_id) from None
    except httpx.HTTPError as exc:
        raise BackendError(NAME, app, "connection", scrub(f"{type(exc).__name__}: {exc}", key),
                           request_id=request_id) from None
    except FalClientHTTPError as exc:
        raise _http_error(exc, app, key, request_id) from None
    except (ValueError, KeyError, TypeError) as exc:  # a body that is not JSON, or not the documented shape
        raise BackendError(NAME, app, "malformed", scrub(f"{type(exc).__name__}: {exc}", key)[:200],
                           request_id=request_id) from None
    # 4. Flagged images are refusals; the rest are downloaded now
    images = result.get("images") if isinstance(result, dict) else None
    if not images or not all(isinstance(i, dict) and i.get("url") for i in images):
        raise BackendError(NAME, app, "malformed", f"unexpected result {str(result)[:80]!r}", request_id=request_id)
    flagged = [bool(x) for x in result.get("has_nsfw_concepts") or []]
    if any(flagged):
        raise BackendError(NAME, app, "refused", f"the safety checker flagged {sum(flagged)} of {len(images)} image(s)",
                           request_id=request_id)
    out = []
    for img in images:
        url = img["url"]
        data = download(url, NAME, app, max(1.0, deadline - time.monotonic()), request_id)
        width, height = img.get("width") or req.width, img.get("height") or req.height
        usd, taken = estimate_usd(target.source, width, height)
        out.append(RemoteImage(data, {
            "backend": NAME, "model": app, "version": None, "request_id": request_id,
            "params_sent": {"arguments": recorded}, "deterministic": False, "usd": usd, "price_table": taken,
            "size": [width, height], "seed_returned": result.get("seed"),
        }))
    return out


def _http_error(exc: Any, app: str, key: str, request_id: str | None) -> BackendError:
    status = exc.status_code
    detail = exc.message if isinstance(exc.message, str) else "; ".join(
        f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}" if isinstance(d, dict) else str(d)
        for d in (exc.message if isinstance(exc.message, list) else [exc.message]))
    kind = "refused" if exc.error_type in REFUSAL_TYPES else kind_of_status(status)
    return BackendError(NAME, app, kind, scrub(f"HTTP {status}: {detail}", key),
                        retry_after=retry_after(exc.response_headers), request_id=request_id)
