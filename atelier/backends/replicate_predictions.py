"""Replicate predictions (``replicate:black-forest-labs/flux-schnell``, ``replicate:owner/name:version``)
through the official ``replicate`` client.

A prediction is created with ``Prefer: wait=N`` (the API holds the request up to N <= 60 s and answers
with the finished prediction when it can); one still ``starting`` / ``processing`` then is polled until
the timeout, then cancelled. The output is a URL or a list of URLs (model-dependent: FLUX schnell / dev
return a list, FLUX 1.1 pro a single URL); each is downloaded at once, without credentials (the URLs
are on a delivery host and expire after about an hour).

Inputs sent (FLUX's schema; ``options["input"]`` adds or overrides any): ``prompt``, ``seed``,
``aspect_ratio`` (closest to the requested size), ``num_outputs`` (when more than one), ``output_format``;
for image to image, the init image as a data URI in ``options["image_input"]`` (default ``image``) and
the strength in ``options["strength_input"]`` (default ``prompt_strength``). FLUX takes no negative prompt:
it is sent only when ``options["negative_input"]`` names the input that takes one.
Inpaint (an inpainting model such as ``black-forest-labs/flux-fill-pro``): the image and the mask (white =
repaint, as FLUX Fill documents) as data URIs in ``image`` and ``options["mask_input"]`` (default ``mask``);
no ``aspect_ratio`` is sent, as the output follows the image.
A seed is accepted but Replicate promises no determinism across hardware or model versions.
"""

from __future__ import annotations

import base64
import math
import re
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

NAME = "replicate"
KEY_ENV = "REPLICATE_API_TOKEN"
TAKES_MASK = True  # inpaint: an edit with a mask (see the module docstring)
ASPECTS = ["1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21"]
REFUSAL = re.compile(r"nsfw|safety|sensitive|flagged|moderat", re.IGNORECASE)
TERMINAL = {"succeeded", "failed", "canceled"}


def aspect_ratio(width: int, height: int) -> str:
    want = math.log(width / height)

    def distance(a: str) -> float:
        w, h = a.split(":")
        return abs(math.log(int(w) / int(h)) - want)

    return min(ASPECTS, key=distance)


def build_input(target: Target, req: RemoteRequest) -> tuple[dict, dict]:
    """(the input sent, the same with image bytes replaced by their size: what lineage records)."""
    opts = target.options
    inp: dict[str, Any] = {"prompt": req.prompt, "output_format": opts.get("output_format", "png")}
    if req.mask is None:
        inp["aspect_ratio"] = aspect_ratio(req.width, req.height)
    if req.seed is not None:
        inp["seed"] = req.seed
    if req.n > 1:
        inp["num_outputs"] = req.n
    if req.negative and opts.get("negative_input"):
        inp[opts["negative_input"]] = req.negative
    recorded = dict(inp)
    if req.init_image is not None:
        image_key = opts.get("image_input", "image")
        inp[image_key] = "data:image/png;base64," + base64.b64encode(req.init_image).decode()
        recorded[image_key] = f"<init image, {len(req.init_image)} bytes>"
        if req.strength is not None and req.mask is None:
            strength_key = opts.get("strength_input", "prompt_strength")
            inp[strength_key] = recorded[strength_key] = req.strength
    if req.mask is not None:
        if req.init_image is None:
            raise BackendError(NAME, target.model, "config", "an inpaint mask needs the image it applies to")
        mask_key = opts.get("mask_input", "mask")
        inp[mask_key] = "data:image/png;base64," + base64.b64encode(req.mask).decode()
        recorded[mask_key] = f"<mask, {len(req.mask)} bytes>"
    extra = dict(opts.get("input", {}))
    return inp | extra, recorded | extra


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """Dollars ``req`` will cost (price table at the requested size), before sending it."""
    usd, _ = estimate_usd(f"{NAME}:{target.model.partition(':')[0]}", req.width, req.height)
    return None if usd is None else usd * req.n


def generate(target: Target, req: RemoteRequest) -> list[RemoteImage]:
    """One attempt at ``req`` (no retries here: the caller's ``RetryPolicy`` decides); see the module docstring."""
    import httpx
    import replicate
    from replicate.exceptions import ReplicateError

    # 1. Check inputs and build the request
    key = api_key(KEY_ENV, NAME)
    model = target.model
    ref, _, version = model.partition(":")
    if ref.count("/") != 1:
        raise BackendError(NAME, model, "config", "name a model as owner/name or owner/name:version")
    inp, recorded = build_input(target, req)
    deadline = time.monotonic() + req.timeout
    wait = max(1, min(60, int(req.timeout)))  # Prefer: wait=N takes 1..60 s
    # 2. The client; a response hook keeps the last response's headers (Retry-After is not on ReplicateError)
    seen: dict[str, str] = {}
    client = replicate.Client(api_token=key, base_url=target.base_url or None,
                              timeout=httpx.Timeout(req.timeout, connect=min(10.0, req.timeout)),
                              event_hooks={"response": [lambda r: seen.update(r.headers)]})
    client.poll_interval = float(target.options.get("poll_interval", 0.5))
    request_id = None
    try:
        # 3. Create the prediction, waiting for it server-side up to `wait` seconds
        seen.clear()
        if version:
            pred = client.predictions.create(version=version, input=inp, wait=wait)
        else:
            pred = client.models.predictions.create(model=ref, input=inp, wait=wait)
        request_id = pred.id
        # 4. Poll until it ends or the timeout passes (then cancel it: no charge for work nobody keeps)
        while pred.status not in TERMINAL:
            if time.monotonic() > deadline:
                status = pred.status
                cancel_quietly(pred)
                raise BackendError(NAME, model, "timeout", f"prediction still {status} after {req.timeout:g} s",
                                   request_id=request_id)
            time.sleep(client.poll_interval)
            seen.clear()
            pred.reload()
    except httpx.TimeoutException:
        raise BackendError(NAME, model, "timeout", f"no response within {req.timeout:g} s", request_id=request_id) from None
    except httpx.HTTPError as exc:
        raise BackendError(NAME, model, "connection", scrub(f"{type(exc).__name__}: {exc}", key),
                           request_id=request_id) from None
    except ReplicateError as exc:
        raise _api_error(exc, model, key, seen, request_id) from None
    except ValueError as exc:  # the body is not JSON, or not a prediction (pydantic's errors are ValueErrors)
        raise BackendError(NAME, model, "malformed", scrub(str(exc), key)[:200], request_id=request_id) from None
    # 5. A failed prediction: moderation, or the model's own error; both fail at once
    if pred.status != "succeeded":
        error = scrub(str(pred.error or pred.status), key)
        kind = "refused" if REFUSAL.search(error) else "failed"
        raise BackendError(NAME, model, kind, f"prediction {pred.status}: {error}", request_id=request_id)
    # 6. Download every output now (URLs expire; data URIs are decoded)
    urls = pred.output if isinstance(pred.output, list) else [pred.output]
    if not urls or not all(isinstance(u, str) and u for u in urls):
        raise BackendError(NAME, model, "malformed", f"unexpected output {str(pred.output)[:80]!r}", request_id=request_id)
    version_seen = pred.version or version or None
    out = []
    for url in urls:
        remaining = max(1.0, deadline - time.monotonic())
        data = download(url, NAME, model, remaining, request_id)
        width, height = _size(data)
        usd, taken = estimate_usd(f"{NAME}:{ref}", width, height)
        out.append(RemoteImage(data, {
            "backend": NAME, "model": ref, "version": version_seen, "request_id": request_id,
            "params_sent": {"input": recorded, "prefer_wait": wait}, "deterministic": False,
            "usd": usd, "price_table": taken, "size": [width, height],
            "predict_time": (pred.metrics or {}).get("predict_time"),
        }))
    return out


def _api_error(exc: Any, model: str, key: str, headers: dict, request_id: str | None) -> BackendError:
    status = exc.status or 0
    detail = scrub(" ".join(str(x) for x in (exc.title, exc.detail) if x) or f"HTTP {status}", key)
    wait = retry_after(headers)
    if wait is None and status == 429 and (m := re.search(r"available in ~?(\d+(?:\.\d+)?)\s*s", exc.detail or "")):
        wait = float(m.group(1))  # "Request was throttled. Expected available in 6 seconds."
    kind = "refused" if status in (400, 422) and REFUSAL.search(detail) else kind_of_status(status)
    return BackendError(NAME, model, kind, f"HTTP {status}: {detail}", retry_after=wait, request_id=request_id)


def _size(data: bytes) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size
