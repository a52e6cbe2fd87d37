"""Remote image backends: hosted APIs and ComfyUI servers as model sources.

A ``ModelSpec`` of kind ``remote`` names its backend in ``source``: ``openai:gpt-image-1``,
``replicate:black-forest-labs/flux-schnell`` (or ``owner/name:version``), ``fal:fal-ai/flux/schnell``,
``together:black-forest-labs/FLUX.1-schnell``, ``comfyui:http://host:8188`` (with a workflow in its
options). ``generate(target, req)`` makes the images, retrying rate limits and server errors under a
``RetryPolicy``, and returns each image's bytes with the facts lineage records.

Keys come from the environment only (``OPENAI_API_KEY``, ``REPLICATE_API_TOKEN``, ``FAL_KEY``,
``TOGETHER_API_KEY``, or a file named in ``<VAR>_FILE``), are handed to the official client for the one
call, and are never part of a fact, a key, a log line or an error message. Endpoints: the official clients'
own settings (``OPENAI_BASE_URL``, ``REPLICATE_BASE_URL``, ``FAL_QUEUE_RUN_HOST``, ``TOGETHER_BASE_URL``),
``ATELIER_COMFYUI_URL`` over a ComfyUI spec's URL, or ``Target.base_url``.

Requests in flight per backend are bounded across threads and processes (``limits``: ``ATELIER_CONCURRENCY``).

Midjourney has no API and its terms forbid automation: there is no backend for it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from typing import Any

from atelier.backends.common import (
    KINDS,
    BackendError,
    RemoteImage,
    RemoteRequest,
    RetryPolicy,
    Target,
    key_is_set,
    with_retries,
)

__all__ = ["BACKENDS", "KINDS", "BackendError", "RemoteImage", "RemoteRequest", "RetryPolicy", "Target", "available",
           "backend_module", "estimate", "generate", "generate_items", "identity", "key_env", "parse_source", "target_of"]

# backend name -> module implementing ``generate(target, req)`` (one attempt) with NAME and KEY_ENV
BACKENDS = {
    "openai": "atelier.backends.openai_images",
    "replicate": "atelier.backends.replicate_predictions",
    "comfyui": "atelier.backends.comfyui",
    "fal": "atelier.backends.fal_queue",
    "together": "atelier.backends.together_images",
}
BASE_URL_ENV = {"comfyui": "ATELIER_COMFYUI_URL"}  # the official clients read their own (OPENAI_BASE_URL, ...)
RUNTIME_OPTIONS = {"poll_interval", "timeout", "attempts", "websocket"}  # how a request is made, not what it makes: not in keys
DEFAULT_TIMEOUT = 180.0  # seconds per generation, polling and downloads included


def backend_module(name: str) -> Any:
    if name not in BACKENDS:
        raise KeyError(f"unknown remote backend {name!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name])


def parse_source(source: str, options: Mapping[str, Any] | None = None, base_url: str = "") -> Target:
    """The ``Target`` a remote ``source`` names: ``<backend>:<model>``; unknown backends list the known ones."""
    backend, sep, model = source.partition(":")
    if not sep or not model:
        raise ValueError(f"remote source {source!r} is not <backend>:<model>; backends: {', '.join(BACKENDS)}")
    backend_module(backend)
    env = BASE_URL_ENV.get(backend)
    return Target(backend, model, dict(options or {}), base_url or (os.environ.get(env, "") if env else ""))


def key_env(backend: str) -> str:
    """The environment variable holding ``backend``'s API key ('' when it takes none)."""
    return backend_module(backend).KEY_ENV


def available(source: str) -> tuple[bool, str]:
    """(can ``source`` be called from here, why not or how): its key is set; nothing is sent."""
    try:
        target = parse_source(source)
    except (KeyError, ValueError) as exc:
        return False, str(exc).strip("'\"")
    env = key_env(target.backend)
    if env and not key_is_set(env):
        return False, f"set {env} (or {env}_FILE) to the {target.backend} API key"
    return True, f"{target.backend} API" + (f", key from ${env}" if env else f" at {target.base_url or target.model}")


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """Dollars ``req`` will cost at ``target`` by its price table, before anything is sent (None: unknown)."""
    return backend_module(target.backend).estimate(target, req)


def generate(target: Target, req: RemoteRequest, policy: RetryPolicy = RetryPolicy(), *, context: str = "",
             on_retry: Callable[[BackendError, float], None] | None = None,
             sleep: Callable[[float], None] | None = None) -> list[RemoteImage]:
    """The images ``req`` asks of ``target``, retried under ``policy``; a failure is one ``BackendError`` line.

    ``context`` (e.g. the deliverable) is named in the error. Results are bytes, already downloaded. Each
    attempt holds one of the backend's slots (``limits``) while it is in flight; the waits between do not.
    """
    from atelier.backends import limits

    module = backend_module(target.backend)
    kw = {"sleep": sleep} if sleep else {}
    try:
        bound = limits.bounds(list(BACKENDS))[target.backend]
    except ValueError as exc:
        raise BackendError(target.backend, target.model, "config", str(exc), context=context) from None

    def attempt() -> list[RemoteImage]:
        with limits.slot(target.backend, bound):
            return module.generate(target, req)

    try:
        return with_retries(attempt, policy, on_retry=on_retry, **kw)
    except BackendError as exc:
        raise (exc.for_context(context) if context else exc) from None


# ------------------------------------------------------------------------------------- model specs
def options_of(spec: Any) -> dict:
    """A ``ModelSpec``'s options as plain data: nested (name, value) pairs become dicts, tuples lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple) and v and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in v):
            return {k: plain(x) for k, x in v}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(tuple(spec.options)) if spec.options else {}


def target_of(spec: Any) -> Target:
    """The ``Target`` of a ``ModelSpec`` of kind ``remote``."""
    return parse_source(spec.source, options_of(spec))


def identity(spec: Any) -> dict:
    """What lineage records about a remote model, and what its assets' keys hash: backend, model, the version
    when the source pins one (``owner/name:version``), settings; for ComfyUI the workflow's sha256 (its file
    name, its path and the server's address are not part of it). Never an endpoint, never a key."""
    import hashlib
    from pathlib import Path

    target = target_of(spec)
    options = {k: v for k, v in target.options.items() if k not in RUNTIME_OPTIONS}
    model, _, version = target.model.partition(":") if target.backend == "replicate" else (target.model, "", "")
    ident = {"name": spec.name, "kind": "remote", "source": spec.source, "backend": target.backend, "model": model,
             "version": version or None, "options": options}
    if target.backend == "comfyui":
        workflow = options.pop("workflow", "")
        try:
            sha = hashlib.sha256(Path(str(workflow)).expanduser().read_bytes()).hexdigest()
        except OSError as exc:
            raise BackendError("comfyui", target.model, "config", f"workflow {workflow}: {exc.strerror}") from None
        ident.update(source="comfyui", model=Path(str(workflow)).name, workflow_sha256=sha)
    return ident


def generate_items(spec: Any, prompt: str, negative: str, width: int, height: int, seeds: tuple[int, ...], *,
                   inits: tuple[bytes, ...] = (), strength: float | None = None, references: tuple[bytes, ...] = (),
                   masks: tuple[bytes, ...] = (), concurrency: int = 4, context: str = "", budget: Any = None,
                   on_progress: Callable[[int, int], None] | None = None) -> list[RemoteImage]:
    """One image per seed (and init image, for image to image; and mask, for inpaint) from the remote model
    ``spec``, one request each, up to ``concurrency`` in flight (and never more than the backend's bound,
    ``limits``); in seed order. Any failure fails the call (nothing half-made is returned, so nothing
    half-made is recorded). ``budget`` (``costs.Budget``) reserves the estimates of all
    the requests before the first is sent: a call that would exceed it sends none (the images a stopped call
    had already paid for could not be recorded)."""
    from concurrent.futures import ThreadPoolExecutor

    target = target_of(spec)
    opts = target.options
    policy = RetryPolicy(attempts=int(opts.get("attempts", RetryPolicy.attempts)))
    timeout = float(opts.get("timeout", DEFAULT_TIMEOUT))
    if inits and len(inits) != len(seeds):
        raise ValueError(f"{len(inits)} init images but {len(seeds)} seeds")
    if masks and len(masks) != len(inits):
        raise ValueError(f"{len(masks)} masks but {len(inits)} init images")
    if masks and not getattr(backend_module(target.backend), "TAKES_MASK", False):
        takes = [b for b in BACKENDS if getattr(backend_module(b), "TAKES_MASK", False)]
        raise BackendError(target.backend, target.model, "config", f"this backend takes no inpaint mask; those that "
                           f"do: {', '.join(takes)}", context=context)
    reqs = [RemoteRequest(prompt, negative, width, height, seed, 1, inits[i] if inits else None,
                          strength if inits else None, timeout, references, masks[i] if masks else None)
            for i, seed in enumerate(seeds)]
    if budget is not None and reqs:
        try:
            budget.reserve_all([estimate(target, req) for req in reqs], target.source)
        except BackendError as exc:
            raise (exc.for_context(context) if context else exc) from None
    done: list[int] = []

    def one(i: int) -> RemoteImage:
        [img] = generate(target, reqs[i], policy, context=f"{context} seed {seeds[i]}".strip())
        done.append(i)
        if on_progress:
            on_progress(len(done), len(seeds))
        return img

    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(seeds)))) as pool:
        return list(pool.map(one, range(len(seeds))))
