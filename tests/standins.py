"""Local stand-ins for the remote image APIs, on 127.0.0.1, for the official clients to talk to.

Each implements the request / response shapes its provider documents (paths, JSON fields, status codes,
error bodies) and answers with real PNG bytes made by PIL, so the real client code runs end to end:

- ``OpenAIStandIn``: ``POST /v1/images/generations`` (JSON) and ``/v1/images/edits`` (multipart),
  ``{"created", "data": [{"b64_json"}|{"url"}], "usage"}``, an ``x-request-id`` header, errors as
  ``{"error": {"message", "type", "param", "code"}}`` (``moderation_blocked``, ``invalid_api_key``);
- ``ReplicateStandIn``: ``POST /v1/models/{owner}/{name}/predictions`` and ``/v1/predictions`` with
  ``Prefer: wait``, ``GET /v1/predictions/{id}``, ``POST .../cancel``, predictions as the API returns them
  (a list of output URLs, or one URL for single-output models), RFC 7807 error bodies, output files on a
  ``/delivery/`` path that can be made to expire;
- ``FalStandIn``: fal's queue over HTTPS (``POST /{app}``, ``GET .../requests/{id}/status`` IN_QUEUE ->
  COMPLETED, ``GET .../requests/{id}``, ``PUT .../cancel``), results with ``has_nsfw_concepts``;
- ``TogetherStandIn``: ``POST /v1/images/generations`` (JSON), ``{"id", "model", "object": "list", "data":
  [{"index", "type": "b64_json", "b64_json"}|{"index", "type": "url", "url"}]}``, errors in OpenAI's shape;
- ``ComfyUIStandIn``: ``POST /prompt`` (``node_errors`` on an unknown node class), the ``/ws?clientId=``
  WebSocket (``execution_start``, ``executing``, ``progress``, then ``executing`` with no node or
  ``execution_error``), ``GET /history/{id}`` (empty while running), ``GET /view``, ``POST /upload/image``,
  ``POST /queue``, ``GET /system_stats``.

Failure modes are queued with ``fault(kind, ...)`` and hit the next API request (file downloads only
by ``expire``): ``429`` (with ``Retry-After``), ``500``, ``malformed`` (a 200 whose body is not JSON),
``slow`` (answers after ``delay`` seconds). A prompt containing ``FORBIDDEN`` is refused by moderation.
Every request is logged in ``requests`` (method, path, headers, parsed body) for tests to inspect;
``latency`` makes every API request take that long, and ``max_in_flight`` is the most API requests the
stand-in was answering at one time (how a concurrency bound is seen from the provider's side).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import io
import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image, ImageDraw

REFUSE_WORD = "FORBIDDEN"


def png_bytes(width: int, height: int, text: str = "", fmt: str = "PNG") -> bytes:
    """A real image: a colour from ``text``'s hash, a diagonal band, encoded as ``fmt``."""
    h = hashlib.sha256(text.encode()).digest()
    im = Image.new("RGB", (width, height), tuple(h[:3]))
    ImageDraw.Draw(im).polygon([(0, 0), (width // 3, 0), (width, height), (width * 2 // 3, height)], fill=tuple(h[3:6]))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def image_size(data: bytes | str) -> tuple[int, int, str]:
    """(width, height, PIL mode) of image bytes or a ``data:`` URI: what an API checks of an input image."""
    if isinstance(data, str):
        data = base64.b64decode(data.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as im:
        return im.width, im.height, im.mode


@dataclass
class Fault:
    kind: str  # 429 | 500 | malformed | slow
    retry_after: str | None = "0"
    delay: float = 0.0
    path: str = ""  # only requests whose path starts with this (all API requests when empty)


@dataclass
class Logged:
    method: str
    path: str
    headers: dict  # names lower-cased
    body: Any


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # quiet: tests read ``requests`` instead
        pass

    def _handle(self, method: str) -> None:
        stand = self.server.stand
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlparse(self.path)
        body = _parse_body(self.headers.get("Content-Type", ""), raw)
        sent = {k.lower(): v for k, v in self.headers.items()}  # header names are case-insensitive
        stand.requests.append(Logged(method, url.path, sent, body))
        try:
            status, headers, payload = stand.route(method, url.path, parse_qs(url.query), body, sent)
        except Exception as exc:  # noqa: BLE001 - a stand-in bug shows up as a 500 the test can read
            status, headers, payload = 500, {}, {"stand_in_error": repr(exc)}
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        if not isinstance(payload, bytes):
            headers = {"Content-Type": "application/json", **headers}
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlparse(self.path)
        if url.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            stand = self.server.stand
            client_id = (parse_qs(url.query).get("clientId") or [""])[0]
            stand.requests.append(Logged("GET", "/ws", {k.lower(): v for k, v in self.headers.items()},
                                         {"clientId": client_id}))
            self._websocket(stand, client_id)
            return
        self._handle("GET")

    def _websocket(self, stand: StandIn, client_id: str) -> None:
        """A WebSocket (RFC 6455) that sends the JSON events ``stand`` queues for ``client_id``, until the
        client closes it or the stand-in stops."""
        import select

        accept = base64.b64encode(hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
        self.protocol_version = "HTTP/1.1"  # a WebSocket handshake is HTTP/1.1 (http.server answers 1.0)
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        events = stand.open_socket(client_id)
        try:
            while not stand.closing:
                try:
                    event = events.get(timeout=0.02)
                    self.wfile.write(_ws_frame(json.dumps(event).encode()))
                    self.wfile.flush()
                except queue.Empty:
                    pass
                if select.select([self.connection], [], [], 0)[0]:
                    if _ws_read_opcode(self.rfile) in (None, 8):  # closed, or a close frame
                        self.wfile.write(b"\x88\x00")
                        break
        except OSError:
            pass
        finally:
            stand.sockets.pop(client_id, None)
            self.close_connection = True

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._handle("PUT")


WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _ws_frame(payload: bytes) -> bytes:
    """One unmasked text frame (server to client)."""
    n = len(payload)
    head = bytes([0x81, n]) if n < 126 else bytes([0x81, 126]) + n.to_bytes(2, "big") if n < 65536 \
        else bytes([0x81, 127]) + n.to_bytes(8, "big")
    return head + payload


def _ws_read_opcode(rfile: Any) -> int | None:
    """Read one (masked) client frame; its opcode, or None when the connection is gone."""
    head = rfile.read(2)
    if len(head) < 2:
        return None
    n = head[1] & 0x7F
    if n >= 126:
        n = int.from_bytes(rfile.read(2 if n == 126 else 8), "big")
    rfile.read((4 if head[1] & 0x80 else 0) + n)
    return head[0] & 0x0F


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stand: StandIn


@dataclass
class StandIn:
    """A stand-in server: ``with OpenAIStandIn(key) as s: ... s.url``; faults queue up per request."""

    key: str = ""
    requests: list[Logged] = field(default_factory=list)
    faults: deque = field(default_factory=deque)
    tls: Any = None  # an ssl.SSLContext: serve HTTPS (``tls_context``), for clients that speak nothing else
    expired: bool = False  # result files answer 404 (a provider URL past its hour)
    files: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sockets: dict = field(default_factory=dict)  # client id -> queue of events for its WebSocket
    closing: bool = False
    latency: float = 0.0  # seconds every API request takes before it is answered
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:  # subclasses set up their own state
        pass

    def __enter__(self) -> StandIn:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stand = self
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def open_socket(self, client_id: str) -> queue.Queue:
        self.sockets[client_id] = queue.Queue()
        return self.sockets[client_id]

    def push(self, client_id: str, event: dict) -> None:
        """Send ``event`` to ``client_id``'s WebSocket, when it has one open."""
        if client_id in self.sockets:
            self.sockets[client_id].put(event)

    def __exit__(self, *exc: Any) -> None:
        self.closing = True
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls is not None else 'http'}://{host}:{port}"

    @property
    def host(self) -> str:
        return self.url.split("://", 1)[1]

    def fault(self, kind: str, times: int = 1, **kw: Any) -> None:
        for _ in range(times):
            self.faults.append(Fault(kind, **kw))

    def api_requests(self) -> list[Logged]:
        return [r for r in self.requests if not r.path.startswith(("/files/", "/delivery/", "/view", "/ws"))]

    def route(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        if path.startswith(("/files/", "/delivery/")):
            if self.expired or path not in self.files:
                return 404, {"Content-Type": "text/plain"}, b"Not Found"
            return 200, {"Content-Type": "image/png"}, self.files[path]
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency)
            return self._route_api(method, path, query, body, headers)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _route_api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        with self.lock:
            fault = next((f for f in self.faults if path.startswith(f.path)), None)
            if fault:
                self.faults.remove(fault)
        if fault and fault.kind == "slow":
            time.sleep(fault.delay)
        elif fault and fault.kind == "429":
            return 429, {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}, self.throttled()
        elif fault and fault.kind == "500":
            return 500, {}, self.server_error()
        elif fault and fault.kind == "malformed":
            return 200, {"Content-Type": "application/json"}, b'{"created": 17, "data": [{"b64_json": "iVBOR'
        return self.api(method, path, query, body, headers)

    def serve_file(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return self.url + path

    # provider-specific
    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        raise NotImplementedError

    def throttled(self) -> Any:
        return {"error": "rate limited"}

    def server_error(self) -> Any:
        return {"error": "internal"}


# ------------------------------------------------------------------------------------------ OpenAI
class OpenAIStandIn(StandIn):
    """``base_url`` for the client: ``stand.url + "/v1"``."""

    def throttled(self) -> Any:
        return {"error": {"message": "Rate limit reached for images per minute. Please try again in 1s.",
                          "type": "requests", "param": None, "code": "rate_limit_exceeded"}}

    def server_error(self) -> Any:
        return {"error": {"message": "The server had an error while processing your request.", "type": "server_error",
                          "param": None, "code": None}}

    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        rid = {"x-request-id": f"req_{uuid.uuid4().hex[:24]}"}
        if headers.get("authorization") != f"Bearer {self.key}":
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            # the real API masks most of the key; this one echoes it whole, so scrubbing is tested at its worst
            return 401, rid, {"error": {"message": f"Incorrect API key provided: {sent}.", "type": "invalid_request_error",
                                        "param": None, "code": "invalid_api_key"}}
        if method != "POST" or path not in ("/v1/images/generations", "/v1/images/edits"):
            return 404, rid, {"error": {"message": f"Invalid URL ({method} {path})", "type": "invalid_request_error",
                                        "param": None, "code": None}}
        prompt = str(body.get("prompt", ""))
        if not prompt:
            return 400, rid, {"error": {"message": "Missing required parameter: 'prompt'.",
                                        "type": "invalid_request_error", "param": "prompt", "code": "missing_required_parameter"}}
        if path.endswith("edits") and "image" not in body and "image[]" not in body:
            return 400, rid, {"error": {"message": "Missing required parameter: 'image'.",
                                        "type": "invalid_request_error", "param": "image", "code": "missing_required_parameter"}}
        if REFUSE_WORD in prompt:
            return 400, rid, {"error": {"message": "Your request was rejected as a result of our safety system. Your request "
                                        "may contain content that is not allowed by our safety system.",
                                        "type": "image_generation_user_error", "param": None, "code": "moderation_blocked"}}
        if "mask" in body:  # the API's rules: a PNG with an alpha channel, the first image's size
            first = body["image"] if "image" in body else body["image[]"][0]
            mw, mh, mode = image_size(body["mask"]["content"])
            if mode not in ("RGBA", "LA") or (mw, mh) != image_size(first["content"])[:2]:
                return 400, rid, {"error": {"message": "Invalid mask image format - mask size does not match image size "
                                            "or has no alpha channel", "type": "invalid_request_error", "param": "mask",
                                            "code": "invalid_image_format"}}
        width, height = (int(x) for x in str(body.get("size", "1024x1024")).split("x"))
        n = int(body.get("n", 1))
        images = [png_bytes(width, height, f"{prompt}/{i}") for i in range(n)]
        if body.get("response_format") == "url":
            data = [{"url": self.serve_file(f"/files/{uuid.uuid4().hex}.png", im), "revised_prompt": prompt} for im in images]
        else:
            data = [{"b64_json": base64.b64encode(im).decode()} for im in images]
        return 200, rid, {"created": int(time.time()), "data": data, "background": "opaque", "output_format": "png",
                          "quality": body.get("quality", "medium"), "size": f"{width}x{height}",
                          "usage": {"input_tokens": 50, "input_tokens_details": {"image_tokens": 0, "text_tokens": 50},
                                    "output_tokens": 272 * n, "total_tokens": 50 + 272 * n}}


# ------------------------------------------------------------------------------------------ Replicate
SINGLE_OUTPUT = {"black-forest-labs/flux-1.1-pro", "black-forest-labs/flux-pro"}


class ReplicateStandIn(StandIn):
    """``base_url`` for the client: ``stand.url``. ``processing_polls``: GETs a prediction stays processing."""

    processing_polls: int = 0
    predictions: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.predictions = {}

    def throttled(self) -> Any:
        return {"title": "Request was throttled", "detail": "Request was throttled. Expected available in 1 second.",
                "status": 429}

    def server_error(self) -> Any:
        return {"title": "Internal Server Error", "detail": "Something went wrong.", "status": 500}

    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        if headers.get("authorization") != f"Bearer {self.key}":
            return 401, {}, {"title": "Unauthenticated", "detail": "You did not pass a valid authentication token",
                             "status": 401}
        parts = path.strip("/").split("/")
        if method == "POST" and (parts[:2] == ["v1", "models"] and parts[-1] == "predictions" and len(parts) == 5
                                 or parts == ["v1", "predictions"]):
            model = "/".join(parts[2:4]) if len(parts) == 5 else f"versioned/{body.get('version')}"
            return self._create(model, body.get("version", "hidden"), body.get("input") or {}, headers)
        if method == "GET" and parts[:2] == ["v1", "predictions"] and len(parts) == 3:
            return self._get(parts[2])
        if method == "POST" and parts[:2] == ["v1", "predictions"] and len(parts) == 4 and parts[3] == "cancel":
            pred = self.predictions.get(parts[2])
            if pred is None:
                return 404, {}, {"title": "Not found", "detail": "Prediction not found", "status": 404}
            pred["_state"].update(polls=10**9)
            pred.update(status="canceled", completed_at=_now())
            return 200, {}, _public(pred)
        return 404, {}, {"title": "Not found", "detail": f"{method} {path}", "status": 404}

    def _create(self, model: str, version: str, inp: dict, headers: dict) -> tuple[int, dict, Any]:
        prompt = str(inp.get("prompt", ""))
        if not prompt:
            return 422, {}, {"title": "Input validation failed", "detail": "- input: prompt is required", "status": 422}
        if inp.get("aspect_ratio") not in (None, "1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16",
                                           "9:21", "custom"):
            return 422, {}, {"title": "Input validation failed",
                             "detail": f"- input.aspect_ratio: must be one of the allowed values, got {inp['aspect_ratio']}",
                             "status": 422}
        pid = uuid.uuid4().hex[:26]
        base = self.url
        pred = {"id": pid, "model": model, "version": version if version != "hidden" else "hidden", "input": inp,
                "logs": "", "output": None, "data_removed": False, "error": None, "status": "starting",
                "created_at": _now(), "started_at": None, "completed_at": None, "metrics": {},
                "urls": {"cancel": f"{base}/v1/predictions/{pid}/cancel", "get": f"{base}/v1/predictions/{pid}",
                         "stream": f"{base}/stream/{pid}", "web": f"{base}/p/{pid}"},
                "_state": {"polls": self.processing_polls}}
        self.predictions[pid] = pred
        if "wait" not in headers.get("prefer", "") or self.processing_polls:
            pred.update(status="processing", started_at=_now())
            return 201, {}, _public(pred)
        self._finish(pred)
        return 201, {}, _public(pred)

    def _get(self, pid: str) -> tuple[int, dict, Any]:
        pred = self.predictions.get(pid)
        if pred is None:
            return 404, {}, {"title": "Not found", "detail": "Prediction not found", "status": 404}
        state = pred["_state"]
        if pred["status"] == "processing":
            if state["polls"] > 0:
                state["polls"] -= 1
            else:
                self._finish(pred)
        return 200, {}, _public(pred)

    def _finish(self, pred: dict) -> None:
        inp = pred["input"]
        prompt = str(inp["prompt"])
        if REFUSE_WORD in prompt:
            pred.update(status="failed", completed_at=_now(),
                        error="NSFW content detected. Try running it again, or try a different prompt.")
            return
        w, h = (int(x) for x in str(inp.get("aspect_ratio", "1:1")).replace("custom", "1:1").split(":"))
        scale = 64 // max(w, h) or 1
        size = (w * scale * 4, h * scale * 4)  # small images: tests stay fast
        if "mask" in inp:  # an inpainting model (FLUX Fill): the output has the input image's size
            size = image_size(inp["image"])[:2]
            if image_size(inp["mask"])[:2] != size:
                pred.update(status="failed", completed_at=_now(), error="mask and image must have the same size")
                return
        n = int(inp.get("num_outputs", 1))
        fmt = str(inp.get("output_format", "webp")).lower()
        ext = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}.get(fmt, "webp")
        pil_fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
        urls = [self.serve_file(f"/delivery/{pred['id']}/out-{i}.{ext}",
                                png_bytes(*size, f"{prompt}/{inp.get('seed')}/{i}", pil_fmt)) for i in range(n)]
        pred.update(status="succeeded", started_at=pred["started_at"] or _now(), completed_at=_now(),
                    output=urls[0] if pred["model"] in SINGLE_OUTPUT else urls, metrics={"predict_time": 0.42},
                    logs=f"Using seed: {inp.get('seed', 1234)}\n")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def _public(pred: dict) -> dict:
    return {k: v for k, v in pred.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------ Together
class TogetherStandIn(StandIn):
    """``base_url`` for the client: ``stand.url``. Together's error text for a moderation refusal is not
    documented: this one answers 422 with a message naming NSFW content, as the API's safety checker does."""

    def throttled(self) -> Any:
        return {"error": {"message": "You have reached the rate limit specific to this model.", "type": "rate_limit",
                          "param": None, "code": "rate_limit_exceeded"}}

    def server_error(self) -> Any:
        return {"error": {"message": "Internal server error", "type": "server_error", "param": None, "code": None}}

    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        if headers.get("authorization") != f"Bearer {self.key}":
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            return 401, {}, {"error": {"message": f"Invalid API key provided. You can find your API key at the settings. "
                                                  f"(got {sent})", "type": "invalid_request_error", "param": None,
                                       "code": "invalid_api_key"}}
        if method != "POST" or path != "/v1/images/generations":
            return 404, {}, {"error": {"message": f"Not found: {method} {path}", "type": "invalid_request_error",
                                       "param": None, "code": None}}
        prompt, model = str(body.get("prompt", "")), str(body.get("model", ""))
        if not prompt or not model:
            return 400, {}, {"error": {"message": "prompt and model are required", "type": "invalid_request_error",
                                       "param": "prompt" if not prompt else "model", "code": None}}
        width, height = int(body.get("width", 1024)), int(body.get("height", 768))
        if width % 16 or height % 16 or not (64 <= width <= 1792 and 64 <= height <= 1792):
            return 400, {}, {"error": {"message": f"width and height must be multiples of 16 between 64 and 1792, got "
                                                  f"{width}x{height}", "type": "invalid_request_error", "param": "width",
                                       "code": None}}
        if REFUSE_WORD in prompt:
            return 422, {}, {"error": {"message": "Your prompt was flagged as NSFW content by the safety checker. Please "
                                                  "modify your prompt.", "type": "invalid_request_error", "param": "prompt",
                                       "code": None}}
        fmt = "JPEG" if body.get("output_format", "jpeg") == "jpeg" else "PNG"
        seed, n = body.get("seed"), int(body.get("n", 1))
        images = [png_bytes(width, height, f"{prompt}/{seed}/{body.get('image_url', '')[:64]}/{i}", fmt) for i in range(n)]
        if body.get("response_format", "url") == "base64":
            data = [{"index": i, "type": "b64_json", "b64_json": base64.b64encode(im).decode()} for i, im in enumerate(images)]
        else:
            data = [{"index": i, "type": "url", "url": self.serve_file(f"/files/{uuid.uuid4().hex}.{fmt.lower()}", im)}
                    for i, im in enumerate(images)]
        return 200, {}, {"id": f"{uuid.uuid4().hex[:16]}-LAX", "model": model, "object": "list", "data": data}


# ------------------------------------------------------------------------------------------ ComfyUI
class ComfyUIStandIn(StandIn):
    """``running_polls``: history GETs a prompt stays unfinished; ``execution_error``: the next run fails."""

    running_polls: int = 0
    execution_error: bool = False
    prompts: dict = None  # type: ignore[assignment]
    uploads: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.prompts, self.uploads = {}, {}

    KNOWN_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler", "KSamplerAdvanced",
                   "VAEDecode", "VAEEncode", "SaveImage", "LoadImage", "PreviewImage", "LoraLoader"}

    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        if method == "POST" and path == "/prompt":
            return self._queue(body)
        if method == "GET" and path.startswith("/history/"):
            return self._history(path.removeprefix("/history/"))
        if method == "GET" and path == "/view":
            name = (query.get("filename") or [""])[0]
            data = self.files.get(f"/view/{(query.get('type') or ['output'])[0]}/{name}")
            return (200, {"Content-Type": "image/png"}, data) if data else (404, {"Content-Type": "text/plain"}, b"")
        if method == "POST" and path == "/upload/image":
            name = body["image"]["filename"]
            self.uploads[name] = body["image"]["content"]
            return 200, {}, {"name": name, "subfolder": "", "type": "input"}
        if method == "POST" and path == "/queue":
            for pid in body.get("delete", []):
                self.prompts.pop(pid, None)
            return 200, {}, {}
        if method == "GET" and path == "/system_stats":
            return 200, {}, {"system": {"os": "posix", "comfyui_version": "0.3.40", "python_version": "3.11",
                                        "embedded_python": False}, "devices": []}
        return 404, {"Content-Type": "text/plain"}, b"404: Not Found"

    def _queue(self, body: dict) -> tuple[int, dict, Any]:
        workflow = body.get("prompt")
        if not isinstance(workflow, dict):
            return 400, {}, {"error": {"type": "invalid_prompt", "message": "Cannot execute because of invalid prompt",
                                       "details": "", "extra_info": {}}, "node_errors": {}}
        bad = {nid: {"errors": [{"type": "invalid_node", "message": f"Node class {n.get('class_type')!r} not found",
                                 "details": "", "extra_info": {}}], "dependent_outputs": [], "class_type": n.get("class_type")}
               for nid, n in workflow.items() if n.get("class_type") not in self.KNOWN_NODES}
        if bad:
            return 400, {}, {"error": {"type": "prompt_outputs_failed_validation",
                                       "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                             "node_errors": bad}
        pid = str(uuid.uuid4())
        run = {"workflow": workflow, "polls": self.running_polls, "number": len(self.prompts), "error": self.execution_error}
        self.prompts[pid] = run
        self.execution_error = False
        client = str(body.get("client_id", ""))
        sampler = next((nid for nid, n in workflow.items() if n["class_type"].startswith("KSampler")), None)
        self.push(client, {"type": "execution_start", "data": {"prompt_id": pid, "timestamp": int(time.time() * 1000)}})
        self.push(client, {"type": "executing", "data": {"node": sampler, "display_node": sampler, "prompt_id": pid}})
        self.push(client, {"type": "progress", "data": {"value": 1, "max": 2, "prompt_id": pid, "node": sampler}})

        def finish() -> None:  # the socket's word that the run has ended; the history then has it
            run["polls"] = 0
            if run["error"]:
                self.push(client, {"type": "execution_error", "data": {
                    "prompt_id": pid, "node_id": sampler, "node_type": "KSampler", "exception_type": "torch.OutOfMemoryError",
                    "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB", "traceback": []}})
            else:
                self.push(client, {"type": "executing", "data": {"node": None, "prompt_id": pid}})

        if client in self.sockets:
            timer = threading.Timer(0.05 * run["polls"] if run["polls"] < 1000 else 3600, finish)
            timer.daemon = True
            timer.start()
        return 200, {}, {"prompt_id": pid, "number": run["number"], "node_errors": {}}

    def _history(self, pid: str) -> tuple[int, dict, Any]:
        run = self.prompts.get(pid)
        if run is None:
            return 200, {}, {}
        if run["polls"] > 0:
            run["polls"] -= 1
            return 200, {}, {}
        wf = run["workflow"]
        if run["error"]:
            sampler = next(nid for nid, n in wf.items() if n["class_type"].startswith("KSampler"))
            status = {"status_str": "error", "completed": False, "messages": [
                ["execution_start", {"prompt_id": pid, "timestamp": 1}],
                ["execution_error", {"prompt_id": pid, "node_id": sampler, "node_type": wf[sampler]["class_type"],
                                     "executed": [], "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB",
                                     "exception_type": "torch.OutOfMemoryError", "traceback": [],
                                     "current_inputs": {}, "current_outputs": {}}]]}
            return 200, {}, {pid: {"prompt": [run["number"], pid, wf, {}, []], "outputs": {}, "status": status}}
        if "images" not in run:
            run["images"] = self._render(pid, wf)
        outputs = {nid: {"images": imgs} for nid, imgs in run["images"].items()}
        status = {"status_str": "success", "completed": True,
                  "messages": [["execution_start", {"prompt_id": pid}], ["execution_success", {"prompt_id": pid}]]}
        return 200, {}, {pid: {"prompt": [run["number"], pid, wf, {}, list(outputs)], "outputs": outputs, "status": status,
                               "meta": {nid: {"node_id": nid, "display_node": nid} for nid in outputs}}}

    def _render(self, pid: str, wf: dict) -> dict:
        text = json.dumps(wf, sort_keys=True)
        latent = next((n["inputs"] for n in wf.values() if n["class_type"] == "EmptyLatentImage"), None)
        if latent:
            size, batch = (int(latent["width"]), int(latent["height"])), int(latent.get("batch_size", 1))
        else:
            load = next(n["inputs"] for n in wf.values() if n["class_type"] == "LoadImage")
            with Image.open(io.BytesIO(self.uploads[load["image"]])) as im:
                size, batch = im.size, 1
        out = {}
        for nid, node in wf.items():
            if node["class_type"] in ("SaveImage", "PreviewImage"):
                kind = "output" if node["class_type"] == "SaveImage" else "temp"
                imgs = []
                for i in range(batch):
                    name = f"ComfyUI_{pid[:8]}_{nid}_{i:05d}_.png"
                    self.files[f"/view/{kind}/{name}"] = png_bytes(*size, f"{text}/{i}")
                    imgs.append({"filename": name, "subfolder": "", "type": kind})
                out[nid] = imgs
        return out


# ------------------------------------------------------------------------------------------ fal
class FalStandIn(StandIn):
    """fal's queue (``queue.fal.run``): HTTPS only, as fal-client speaks nothing else (``tls=tls_context(...)``).
    ``queued_polls``: status GETs a request stays IN_QUEUE; ``app_error``: the next request completes with an error."""

    queued_polls: int = 0
    app_error: tuple[str, str] | None = None  # (error_type, error)
    jobs: dict = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.jobs = {}

    def throttled(self) -> Any:
        return {"detail": "Rate limit exceeded"}

    def server_error(self) -> Any:
        return {"detail": "Internal Server Error"}

    def api(self, method: str, path: str, query: dict, body: Any, headers: dict) -> tuple[int, dict, Any]:
        if headers.get("authorization") != f"Key {self.key}":
            return 401, {}, {"detail": "Cannot access application. Authentication is required to access this application."}
        parts = path.strip("/").split("/")
        if "requests" in parts:
            i = parts.index("requests")
            job = self.jobs.get(parts[i + 1] if len(parts) > i + 1 else "")
            rest = parts[i + 2:]
            if job is None:
                return 404, {}, {"detail": "Request not found"}
            if method == "GET" and rest == ["status"]:
                if job["polls"] > 0:
                    job["polls"] -= 1
                    return 200, {}, {"status": "IN_QUEUE", "queue_position": 0, "response_url": job["base"]}
                done = {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 0.31}, "response_url": job["base"]}
                if job["error"]:
                    done.update(error_type=job["error"][0], error=job["error"][1])
                return 200, {}, done
            if method == "GET" and not rest:
                return 200, {}, job["result"]
            if method == "PUT" and rest == ["cancel"]:
                job.update(polls=10**9, canceled=True)
                return 202, {}, {"status": "CANCELLATION_REQUESTED"}
            return 404, {}, {"detail": "Not Found"}
        if method != "POST" or len(parts) < 2:
            return 404, {}, {"detail": "Not Found"}
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not prompt:
            return 422, {}, {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]}
        rid = str(uuid.uuid4())
        base = f"{self.url}/{parts[0]}/{parts[1]}/requests/{rid}"
        size = body.get("image_size") or {"width": 1024, "height": 768}
        width, height = (size["width"], size["height"]) if isinstance(size, dict) else (1024, 768)
        if "mask_url" in body:  # an inpainting endpoint: the output has the input image's size
            width, height, _ = image_size(body["image_url"])
            if image_size(body["mask_url"])[:2] != (width, height):
                return 422, {}, {"detail": [{"loc": ["body", "mask_url"], "msg": "mask and image sizes differ",
                                             "type": "value_error"}]}
        n = int(body.get("num_images", 1))
        flagged = REFUSE_WORD in prompt
        images = [{"url": self.serve_file(f"/files/{rid}-{i}.png", png_bytes(width, height, "" if flagged else f"{prompt}/{i}")),
                   "width": width, "height": height, "content_type": "image/png"} for i in range(n)]
        self.jobs[rid] = {"base": base, "polls": self.queued_polls, "error": self.app_error, "app": "/".join(parts),
                          "result": {"images": images, "timings": {"inference": 0.31}, "seed": body.get("seed", 424242),
                                     "has_nsfw_concepts": [flagged] * n, "prompt": prompt}}
        self.app_error = None
        return 200, {}, {"request_id": rid, "response_url": base, "status_url": f"{base}/status",
                         "cancel_url": f"{base}/cancel", "queue_position": 0}


def tls_context(folder: Any) -> tuple[Any, str]:
    """(a server SSL context for 127.0.0.1, the PEM file a client trusts it with): a self-signed certificate."""
    import datetime
    import ssl
    from ipaddress import IPv4Address
    from pathlib import Path

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = Path(folder)
    cert_file, key_file = folder / "standin-cert.pem", folder / "standin-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx, str(cert_file)


def comfy_workflow(img2img: bool = False) -> dict:
    """A small API-format workflow as ComfyUI's "Save (API format)" writes it (SD 1.5 text to image)."""
    wf = {
        "3": {"class_type": "KSampler", "_meta": {"title": "KSampler"},
              "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
                         "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "_meta": {"title": "Load Checkpoint"},
              "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"},
              "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "_meta": {"title": "Positive"},
              "inputs": {"text": "beautiful scenery nature glass bottle landscape", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "_meta": {"title": "Negative"}, "inputs": {"text": "text, watermark",
                                                                                        "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "_meta": {"title": "VAE Decode"}, "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "_meta": {"title": "Save Image"},
              "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }
    if img2img:
        del wf["5"]
        wf["10"] = {"class_type": "LoadImage", "_meta": {"title": "Load Image"}, "inputs": {"image": "example.png"}}
        wf["11"] = {"class_type": "VAEEncode", "_meta": {"title": "VAE Encode"}, "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
        wf["3"]["inputs"].update(latent_image=["11", 0], denoise=0.75)
    return wf


def _parse_body(content_type: str, raw: bytes) -> Any:
    """JSON, or multipart form data as {name: str | {"filename", "content"}} (lists for repeated names)."""
    if not raw:
        return {}
    if content_type.startswith("application/json"):
        try:
            return json.loads(raw)
        except ValueError:
            return {"_unparsed": raw[:200].decode(errors="replace")}
    if content_type.startswith("multipart/form-data"):
        msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
        form: dict[str, Any] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            filename = part.get_filename()
            content = part.get_payload(decode=True)
            value = {"filename": filename, "content": content} if filename else content.decode()
            form[name] = value if name not in form else [*(form[name] if isinstance(form[name], list) else [form[name]]), value]
        return form
    return {"_raw": raw[:200]}
