"""A ComfyUI server (``comfyui:http://host:8188``) running a user's workflow, over its plain HTTP API.

ComfyUI has no official client. The workflow is the user's own, exported with "Save (API format)"
(``options["workflow"]``: a JSON file of ``{node id: {"class_type", "inputs", "_meta": {"title"}}}``).
atelier fills named inputs and leaves everything else (checkpoints, samplers, LoRAs, ControlNets) as saved:

- ``options["inputs"]`` maps a field (prompt, negative, seed, width, height, batch, init_image, strength)
  to ``"<node id or title>.<input>"``, e.g. ``{"prompt": "Positive.text", "seed": "3.seed"}``;
- fields it leaves out are found from the workflow's one sampler (KSampler / KSamplerAdvanced): the text
  encoders on its ``positive`` / ``negative`` links, its ``seed`` / ``noise_seed`` and ``denoise``, the
  ``EmptyLatentImage`` on its ``latent_image`` link (width, height, batch_size) or, for image to image, the
  ``LoadImage`` behind the ``VAEEncode`` there.

Then: the init image (if any) goes up through ``POST /upload/image``; the progress socket ``/ws?clientId=``
is opened; ``POST /prompt`` queues the workflow with that client id (a 400 carries ``node_errors``: named in
the error); the socket's ``executing`` event with no node (or ``execution_success`` / ``execution_error``)
says the run has ended; ``GET /history/{prompt_id}`` has its outcome (polled instead when there is no
socket, or ``options["websocket"]`` is False; a failure's ``execution_error`` message is the error); each
output image is fetched from ``GET /view``. Past the timeout, the prompt is taken off the queue
(``POST /queue`` ``delete``).
The studio's server costs $0 per image here; a fixed seed on the same server usually repeats an image,
but nothing promises it (GPU kernels, custom nodes), so ``deterministic`` is False.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from pathlib import Path
from typing import Any

from atelier.backends.common import (
    BackendError,
    RemoteImage,
    RemoteRequest,
    Target,
    check_image,
    kind_of_status,
    refuse_mask,
)

NAME = "comfyui"
KEY_ENV = ""  # a ComfyUI server takes no API key
TAKES_MASK = False  # atelier fills no mask input in a workflow (yet): inpaint with another backend
SAMPLERS = {"KSampler": "seed", "KSamplerAdvanced": "noise_seed"}
LATENTS = {"EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo"}
FIELDS = ("prompt", "negative", "seed", "width", "height", "batch", "init_image", "strength")


def load_workflow(target: Target) -> tuple[dict, str]:
    """(the API-format workflow named in ``options["workflow"]``, its sha256)."""
    path = target.options.get("workflow")
    if not path:
        raise BackendError(NAME, target.model, "config", 'name an API-format workflow JSON in options["workflow"]')
    try:
        raw = Path(path).expanduser().read_bytes()
        workflow = json.loads(raw)
    except OSError as exc:
        raise BackendError(NAME, target.model, "config", f"workflow {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise BackendError(NAME, target.model, "config", f"workflow {path} is not JSON: {exc}") from None
    if not isinstance(workflow, dict) or not all(isinstance(n, dict) and "class_type" in n for n in workflow.values()):
        raise BackendError(NAME, target.model, "config",
                           f"workflow {path} is not in API format (export it with 'Save (API format)')")
    return workflow, hashlib.sha256(raw).hexdigest()


def input_slots(workflow: dict, names: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """Where each field goes: {field: (node id, input name)}, from ``names`` first, then from the sampler."""
    slots: dict[str, tuple[str, str]] = {}
    titles = {str((n.get("_meta") or {}).get("title", "")): nid for nid, n in workflow.items()}
    for fld, where in (names or {}).items():
        if fld not in FIELDS:
            raise ValueError(f"unknown workflow field {fld!r}; known: {', '.join(FIELDS)}")
        node, _, inp = where.rpartition(".")
        nid = node if node in workflow else titles.get(node)
        if nid is None or not inp:
            raise ValueError(f"{fld} -> {where!r}: no node {node!r} in the workflow (ids and titles: "
                             f"{', '.join(sorted(workflow))}; {', '.join(t for t in titles if t)})")
        slots[fld] = (nid, inp)
    samplers = [nid for nid, n in workflow.items() if n["class_type"] in SAMPLERS]
    if len(samplers) != 1:
        return slots  # none or several: only what was named explicitly
    sid = samplers[0]
    sampler = workflow[sid]
    inputs = sampler.get("inputs", {})

    def linked(name: str) -> str | None:
        link = inputs.get(name)
        return str(link[0]) if isinstance(link, list) and link and str(link[0]) in workflow else None

    slots.setdefault("seed", (sid, SAMPLERS[sampler["class_type"]]))
    if "denoise" in inputs:
        slots.setdefault("strength", (sid, "denoise"))
    for fld, link in (("prompt", "positive"), ("negative", "negative")):
        nid = linked(link)
        if nid and "text" in workflow[nid].get("inputs", {}):
            slots.setdefault(fld, (nid, "text"))
    lid = linked("latent_image")
    if lid and workflow[lid]["class_type"] in LATENTS:
        slots.setdefault("width", (lid, "width"))
        slots.setdefault("height", (lid, "height"))
        slots.setdefault("batch", (lid, "batch_size"))
    elif lid and workflow[lid]["class_type"] == "VAEEncode":
        pix = workflow[lid]["inputs"].get("pixels")
        if isinstance(pix, list) and str(pix[0]) in workflow and workflow[str(pix[0])]["class_type"] == "LoadImage":
            slots.setdefault("init_image", (str(pix[0]), "image"))
    return slots


def fill(workflow: dict, slots: dict[str, tuple[str, str]], values: dict[str, Any]) -> tuple[dict, dict]:
    """(a copy of ``workflow`` with ``values`` in their slots, what was filled where: for lineage)."""
    filled = json.loads(json.dumps(workflow))
    done = {}
    for fld, value in values.items():
        if value is None or fld not in slots:
            continue
        nid, inp = slots[fld]
        filled[nid].setdefault("inputs", {})[inp] = value
        done[fld] = {"node": nid, "input": inp, "value": value}
    return filled, done


def estimate(target: Target, req: RemoteRequest) -> float | None:
    """The studio's own server: no per-image price."""
    return 0.0


def generate(target: Target, req: RemoteRequest) -> list[RemoteImage]:
    """One attempt at ``req`` (no retries here: the caller's ``RetryPolicy`` decides); see the module docstring."""
    import httpx

    # 1. Check inputs: the workflow, where each field goes
    refuse_mask(req, NAME, target.model)
    server = (target.base_url or target.model).rstrip("/")
    workflow, workflow_sha = load_workflow(target)
    try:
        slots = input_slots(workflow, dict(target.options.get("inputs", {})))
    except ValueError as exc:
        raise BackendError(NAME, server, "config", str(exc)) from None
    if req.init_image is not None and "init_image" not in slots:
        raise BackendError(NAME, server, "config", "image to image needs a LoadImage node (name it in options['inputs'])")
    if "prompt" not in slots:
        raise BackendError(NAME, server, "config",
                           "no prompt input found: name it in options['inputs'] (e.g. 'prompt': '6.text')")
    deadline = time.monotonic() + req.timeout
    client_id = uuid.uuid4().hex
    with httpx.Client(base_url=server, timeout=httpx.Timeout(req.timeout, connect=min(10.0, req.timeout))) as http:
        call = _Caller(http, server)
        # 2. Upload the init image; fill the workflow
        init_name = None
        if req.init_image is not None:
            up = call.json("POST", "/upload/image", files={"image": (f"atelier-{client_id}.png", req.init_image, "image/png")},
                           data={"overwrite": "true"})
            init_name = f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]
        values = {"prompt": req.prompt, "negative": req.negative if "negative" in slots else None, "seed": req.seed,
                  "width": req.width, "height": req.height, "batch": req.n, "init_image": init_name,
                  "strength": req.strength if req.init_image is not None else None}
        filled, done = fill(workflow, slots, values)
        # 3. Listen on the progress socket (before queueing, so no event is missed), then queue it
        socket = _open_socket(server, client_id, deadline) if target.options.get("websocket", True) else None
        try:
            queued = call.json("POST", "/prompt", json={"prompt": filled, "client_id": client_id})
            prompt_id = queued.get("prompt_id")
            if not prompt_id:
                raise BackendError(NAME, server, "malformed", f"/prompt answered without a prompt_id: {str(queued)[:80]}")
            # 4. Wait for it: the socket says when it has finished (or failed); the history has the outcome
            if socket is not None and not _wait_on_socket(socket, prompt_id, deadline):
                call.quiet("POST", "/queue", json={"delete": [prompt_id]})
                raise BackendError(NAME, server, "timeout", f"not finished after {req.timeout:g} s", request_id=prompt_id)
        finally:
            if socket is not None:
                socket.close()
        while True:
            history = call.json("GET", f"/history/{prompt_id}").get(prompt_id)
            status = (history or {}).get("status") or {}
            if status.get("status_str") == "error":
                raise BackendError(NAME, server, "failed", _execution_error(status), request_id=prompt_id)
            if history and (status.get("completed") or (not status and history.get("outputs"))):
                break
            if time.monotonic() > deadline:
                call.quiet("POST", "/queue", json={"delete": [prompt_id]})
                raise BackendError(NAME, server, "timeout", f"not finished after {req.timeout:g} s", request_id=prompt_id)
            time.sleep(float(target.options.get("poll_interval", 0.5)))
        # 5. Fetch every output image now
        refs = [img for out in (history.get("outputs") or {}).values() for img in out.get("images", [])]
        saved = [r for r in refs if r.get("type") == "output"] or refs
        if not saved:
            raise BackendError(NAME, server, "malformed", "the run finished with no output images", request_id=prompt_id)
        version = (call.quiet("GET", "/system_stats") or {}).get("system", {}).get("comfyui_version")
        out = []
        for ref in saved:
            data = call.bytes("GET", "/view", params={"filename": ref.get("filename", ""),
                                                      "subfolder": ref.get("subfolder", ""), "type": ref.get("type", "output")})
            out.append(RemoteImage(check_image(data, NAME, server, prompt_id), {
                "backend": NAME, "model": Path(str(target.options.get("workflow"))).name, "version": version,
                "request_id": prompt_id, "deterministic": False, "usd": 0.0, "price_table": "own server",
                "params_sent": {"workflow_sha256": workflow_sha, "filled": {
                    k: (v if k != "init_image" else {**v, "value": "<uploaded init image>"}) for k, v in done.items()}},
            }))
    return out


def _open_socket(server: str, client_id: str, deadline: float) -> Any:
    """ComfyUI's progress socket (``/ws?clientId=...``), or None when it cannot be opened (then the history
    is polled instead: the socket only saves the polling)."""
    try:
        from websockets.sync.client import connect

        url = server.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + f"/ws?clientId={client_id}"
        return connect(url, open_timeout=max(1.0, min(10.0, deadline - time.monotonic())), close_timeout=1,
                       compression=None, max_size=None)
    except Exception:  # noqa: BLE001 - no socket (an old server, a proxy): poll
        return None


def _wait_on_socket(socket: Any, prompt_id: str, deadline: float) -> bool:
    """Read the socket until ``prompt_id`` has finished, failed or been interrupted (True), or the deadline
    passes (False). Binary messages (live previews) are skipped; a dropped socket ends the wait early
    (True: the history is polled from there)."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = socket.recv(timeout=left)
        except TimeoutError:
            return False
        except Exception:  # noqa: BLE001 - the socket closed: the history knows the rest
            return True
        if not isinstance(message, str):
            continue
        try:
            event = json.loads(message)
        except ValueError:
            continue
        data = event.get("data") or {}
        if data.get("prompt_id") != prompt_id:
            continue
        kind = event.get("type")
        if kind in ("execution_success", "execution_error", "execution_interrupted") or (
                kind == "executing" and data.get("node") is None):
            return True
    return False


class _Caller:
    """httpx calls turned into ``BackendError``s naming the server (ComfyUI errors are JSON with ``error``)."""

    def __init__(self, http: Any, server: str) -> None:
        self.http, self.server = http, server

    def _send(self, method: str, path: str, **kw: Any) -> Any:
        import httpx

        try:
            resp = self.http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise BackendError(NAME, self.server, "timeout", f"{method} {path}: no response in time") from None
        except httpx.HTTPError as exc:
            raise BackendError(NAME, self.server, "connection", f"{method} {path}: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            raise BackendError(NAME, self.server, kind_of_status(resp.status_code),
                               f"{method} {path}: HTTP {resp.status_code}{_error_text(resp)}")
        return resp

    def json(self, method: str, path: str, **kw: Any) -> dict:
        resp = self._send(method, path, **kw)
        try:
            body = resp.json()
        except ValueError:
            raise BackendError(NAME, self.server, "malformed", f"{method} {path}: the answer is not JSON") from None
        if not isinstance(body, dict):
            raise BackendError(NAME, self.server, "malformed", f"{method} {path}: the answer is not a JSON object")
        return body

    def bytes(self, method: str, path: str, **kw: Any) -> bytes:
        return self._send(method, path, **kw).content

    def quiet(self, method: str, path: str, **kw: Any) -> dict | None:
        try:
            return self.json(method, path, **kw)
        except BackendError:
            return None


def _error_text(resp: Any) -> str:
    """ComfyUI's error body, shortened: ``error.message`` and each node error (``node_errors``)."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if not isinstance(body, dict):
        return ""
    err = body.get("error")
    parts = [err.get("message", "") if isinstance(err, dict) else str(err or "")]
    for nid, ne in (body.get("node_errors") or {}).items():
        msgs = "; ".join(f"{e.get('message', '')} {e.get('details', '')}".strip() for e in ne.get("errors", []))
        parts.append(f"node {nid} ({ne.get('class_type', '?')}): {msgs}")
    text = " | ".join(p for p in parts if p)
    return f": {text}" if text else ""


def _execution_error(status: dict) -> str:
    for msg in status.get("messages") or []:
        if isinstance(msg, list) and len(msg) == 2 and msg[0] == "execution_error":
            d = msg[1] or {}
            what = f"{d.get('exception_type', '')} {d.get('exception_message', '')}".strip()
            return f"node {d.get('node_id')} ({d.get('node_type')}): {what}"
    return "execution failed"
