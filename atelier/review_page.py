"""The review page: a person decides a run's review gates by clicking, in a browser (``atelier review RUN --serve``).

A stdlib ``ThreadingHTTPServer`` on 127.0.0.1 only (port 0: a free one), every URL under a random token
(``http://127.0.0.1:PORT/TOKEN/``): a request without the token gets a bare 404, nothing else. The page is
self-contained (inline style and script, thumbnails as ``data:`` URIs; the full-size image of a candidate
from the token path) and shows every open gate of the run: its candidates as the contact sheet shows drafts
(thumbnail, number, CLIP's rank and scores, CLIP's suggestion marked). Clicking a candidate keeps it (the order
of clicks is the order kept); each can be rejected or starred (1-5); a note and the reviewer's name go with the
decision. Submitting a gate POSTs it (JSON from the page's script, or a plain form without script) to
``atelier.review.decide``; a mistake (nothing kept, ...) comes back as one clear message on the page.

When every open gate is decided the page says so (and how the run continues) and the server stops; Ctrl-C
stops it too. ``serve_review`` returns whether a decision was recorded.
"""

from __future__ import annotations

import hmac
import html
import json
import secrets
import threading
import time
import webbrowser
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from atelier.contact_sheet import Thumbnails, thumbs_dir
from atelier.errors import UsageError
from atelier.review import OpenGate, decide, default_reviewer, open_gates, parse_stars

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024  # bytes of one POST: a decision is numbers, a name and a note of at most 2000 characters
PAGE_THUMB = 256  # px, long side of a candidate's thumbnail on the page

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 4px;border-bottom:1px solid #ccc}
.meta,.help{color:#666;margin:2px 0} .grid{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
figure{margin:0;background:#fff;border:3px solid #ddd;padding:4px;width:212px;position:relative}
figure img{display:block;width:200px;height:200px;object-fit:contain;cursor:pointer;background:#eee}
figure.kept{border-color:#2a8a3a} figure.rejected{border-color:#b33;opacity:.55}
figcaption{font-size:12px;color:#444} .num{font-weight:bold;font-size:14px}
.suggested{color:#36c;font-weight:bold} .order{position:absolute;top:8px;left:8px;background:#2a8a3a;color:#fff;
font-weight:bold;padding:2px 7px;border-radius:10px} .order:empty{display:none}
.actions{margin-top:4px;display:flex;gap:4px;flex-wrap:wrap;align-items:center}
button{font:inherit;font-size:12px;cursor:pointer} button.star{border:none;background:none;font-size:16px;
color:#bbb;padding:0 1px} button.star.on{color:#e8a400} figure.kept button.keep,figure.rejected button.reject{
font-weight:bold} form .fields{display:grid;grid-template-columns:max-content 1fr;gap:6px 10px;max-width:720px;
margin:8px 0} textarea{min-height:3em} input,textarea{font:inherit}
.msg{margin:6px 0;padding:6px 8px;display:none} .msg.error{display:block;background:#fde8e8;color:#900}
.msg.ok{display:block;background:#e6f4e8;color:#1d5e28} section.decided form{display:none}
#done{display:none;margin:18px 0;padding:12px;background:#e6f4e8;border:2px solid #2a8a3a;font-size:16px}
#done.shown{display:block} code{background:#eee;padding:1px 4px} section.decided figure{pointer-events:none}
figure.clip-kept::after{content:"CLIP";position:absolute;top:8px;right:8px;background:#36c;color:#fff;font-size:11px;
font-weight:bold;padding:1px 5px;border-radius:8px}
"""

SCRIPT = r"""
(function(){
  const gates = {};
  function numbers(text){
    return String(text).split(/[\s,]+/).filter(Boolean).map(Number).filter(n => Number.isInteger(n) && n > 0);
  }
  function starsText(stars){
    return Object.keys(stars).filter(k => stars[k]).map(k => k + "=" + stars[k]).join(",");
  }
  function render(g){
    g.section.querySelectorAll("figure[data-candidate]").forEach(fig => {
      const n = Number(fig.dataset.candidate), at = g.keep.indexOf(n);
      fig.classList.toggle("kept", at >= 0);
      fig.classList.toggle("rejected", g.reject.includes(n));
      fig.querySelector(".order").textContent = at >= 0 ? String(at + 1) : "";
      fig.querySelectorAll("button.star").forEach(b => b.classList.toggle("on", Number(b.dataset.stars) <= (g.stars[n] || 0)));
    });
    g.form.elements.keep.value = g.keep.join(",");
    g.form.elements.reject.value = g.reject.join(",");
    g.form.elements.stars.value = starsText(g.stars);
  }
  function fromFields(g){  // a person may type into the fields, too
    g.keep = numbers(g.form.elements.keep.value);
    g.reject = numbers(g.form.elements.reject.value);
    g.stars = {};
    String(g.form.elements.stars.value).split(",").forEach(p => {
      const [c, s] = p.split("=").map(x => Number(String(x).trim()));
      if (Number.isInteger(c) && Number.isInteger(s)) g.stars[c] = s;
    });
  }
  function show(el, text, kind){ el.textContent = text; el.className = "msg " + kind; }
  document.querySelectorAll("section.gate").forEach(section => {
    const g = {section: section, form: section.querySelector("form"), keep: [], reject: [], stars: {},
               suggestion: numbers(section.dataset.suggestion)};
    gates[section.dataset.gateIndex] = g;
    section.querySelectorAll("figure[data-candidate]").forEach(fig => {
      const n = Number(fig.dataset.candidate);
      function toggleKeep(){
        const at = g.keep.indexOf(n);
        if (at >= 0) g.keep.splice(at, 1); else { g.keep.push(n); g.reject = g.reject.filter(x => x !== n); }
        render(g);
      }
      fig.querySelector("img").addEventListener("click", toggleKeep);
      fig.querySelector("button.keep").addEventListener("click", toggleKeep);
      fig.querySelector("button.reject").addEventListener("click", () => {
        if (g.reject.includes(n)) g.reject = g.reject.filter(x => x !== n);
        else { g.reject.push(n); g.keep = g.keep.filter(x => x !== n); }
        render(g);
      });
      fig.querySelectorAll("button.star").forEach(b => b.addEventListener("click", () => {
        const s = Number(b.dataset.stars);
        g.stars[n] = g.stars[n] === s ? 0 : s;
        render(g);
      }));
    });
    section.querySelector("button.accept").addEventListener("click", () => {
      g.keep = g.suggestion.slice(); g.reject = g.reject.filter(x => !g.keep.includes(x)); render(g);
    });
    section.querySelector("button.clear").addEventListener("click", () => {
      g.keep = []; g.reject = []; g.stars = {}; render(g);
    });
    ["keep", "reject", "stars"].forEach(name => g.form.elements[name].addEventListener("change", () => {
      fromFields(g); render(g);
    }));
    const by = g.form.elements.by;
    by.addEventListener("input", () => {  // one name for every gate on the page
      document.querySelectorAll("section.gate:not(.decided) input[name=by]").forEach(i => {
        if (i !== by) i.value = by.value;
      });
    });
    g.form.addEventListener("submit", ev => {
      ev.preventDefault();
      fromFields(g);
      const f = g.form.elements, msg = section.querySelector(".msg"), button = section.querySelector("button.submit");
      const stars = {};
      Object.keys(g.stars).forEach(k => { if (g.stars[k]) stars[k] = g.stars[k]; });
      const body = {token: f.token.value, decision: f.decision.value, keep: g.keep, reject: g.reject, stars: stars,
                    note: f.note.value, by: f.by.value};
      button.disabled = true;
      fetch("decide", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
                       credentials: "same-origin", cache: "no-store"})
        .then(r => r.json().catch(() => ({ok: false, error: "the server answered " + r.status})))
        .then(res => {
          if (!res.ok) { show(msg, res.error, "error"); button.disabled = false; return; }
          section.classList.add("decided");
          show(msg, res.message, "ok");
          if (res.done) {
            const done = document.getElementById("done");
            done.textContent = res.done_message;
            done.classList.add("shown");
            document.title = "atelier · review done";
            document.getElementById("later").style.display = "none";
          }
        })
        .catch(() => { show(msg, "could not reach the review server (was it stopped?)", "error"); button.disabled = false; });
    });
    render(g);
  });
})();
"""


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def render_page(run_id: str, gates: list[OpenGate], token: str, by: str,
                thumb: Callable[[str, int], str], resumes: bool = False) -> str:
    """The review page for ``gates`` of ``run_id``; ``thumb(path, size)`` gives a candidate's ``data:`` URI."""
    e = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
             f"<title>atelier · review run {e(run_id)}</title><style>{CSS}</style></head><body>",
             f"<h1>Review — run {e(run_id)}</h1>",
             "<p class='help'>Click the images to keep, in the order you want them kept (click again to un-keep); "
             "reject or star (1-5) any of them; add a note, then record the decision. "
             "<span class='suggested'>CLIP</span> marks what CLIP would keep.</p>"]
    if not gates:
        parts.append(f"<p id='nothing'>Nothing awaits review in run {e(run_id)}.</p>")
    for i, g in enumerate(gates, start=1):
        parts.append(f"<section class='gate' id='gate-{i}' data-gate-index='{i}' data-deliverable='{e(g.deliverable)}' "
                     f"data-round='{g.round}' data-decision='{e(g.decision)}' "
                     f"data-suggestion='{','.join(map(str, g.suggestion))}'>"
                     f"<h2>{e(g.deliverable)} · round {g.round}</h2>"
                     f"<p class='meta'>{len(g.candidates)} candidates · CLIP suggests "
                     f"{e(', '.join(map(str, g.suggestion)) or 'none')}</p><div class='grid'>")
        for c in g.candidates:
            src = thumb(c.path, PAGE_THUMB)
            full = f"image/{e(g.decision)}/{c.number}"
            mark = (f" · <span class='suggested' title=\"CLIP's suggestion\">CLIP #{g.suggestion.index(c.number) + 1}"
                    "</span>" if c.clip_kept else "")
            stars = "".join(f"<button type='button' class='star' data-stars='{k}' title='{k} star{'s' * (k > 1)}'>★"
                            "</button>" for k in range(1, 6))
            parts.append(
                f"<figure class='candidate{' clip-kept' if c.clip_kept else ''}' id='g{i}-c{c.number}' "
                f"data-candidate='{c.number}' data-key='{e(c.key)}'><span class='order'></span>"
                f"<img alt='candidate {c.number}' src='{src}' title='click to keep (in order); click again to un-keep'>"
                f"<figcaption><span class='num'>#{c.number}</span> · {e(c.stage)} · CLIP rank {c.clip_rank or '–'}"
                f"{mark}<br>total {_fmt(c.total)} · prompt {_fmt(c.prompt_score)} · mood {_fmt(c.moodboard_score)}"
                f"<br><a href='{full}' target='_blank' rel='noopener noreferrer'>full size</a></figcaption>"
                f"<div class='actions'><button type='button' class='keep'>keep</button>"
                f"<button type='button' class='reject'>reject</button><span class='stars'>{stars}</span></div>"
                "</figure>")
        parts.append(
            f"</div><form method='post' action='decide' id='form-{i}'>"
            f"<input type='hidden' name='token' value='{e(token)}'>"
            f"<input type='hidden' name='decision' value='{e(g.decision)}'><div class='fields'>"
            f"<label for='keep-{i}'>keep, in order</label><input id='keep-{i}' name='keep' placeholder='e.g. 3,1'>"
            f"<label for='reject-{i}'>reject</label><input id='reject-{i}' name='reject' placeholder='e.g. 2'>"
            f"<label for='stars-{i}'>stars</label><input id='stars-{i}' name='stars' placeholder='candidate=stars, e.g. 3=5'>"
            f"<label for='note-{i}'>note</label><textarea id='note-{i}' name='note' maxlength='2000'></textarea>"
            f"<label for='by-{i}'>your name</label><input id='by-{i}' name='by' maxlength='64' value='{e(by)}'>"
            f"</div><button type='button' class='accept' id='accept-{i}'>keep CLIP's suggestion</button> "
            f"<button type='button' class='clear' id='clear-{i}'>clear</button> "
            f"<button type='submit' class='submit' id='submit-{i}'>record decision</button></form>"
            f"<div class='msg' id='msg-{i}' role='status'></div></section>")
    parts.append(f"<div id='done' role='status'></div><p class='meta' id='later'>continue the run later: "
                 f"<code>atelier resume {e(run_id)}</code>{' (or it resumes by itself once all are decided)' * resumes}"
                 f"</p><script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def _done_message(run_id: str, resumes: bool) -> str:
    if resumes:
        return f"All decisions are recorded. Run {run_id} resumes now (see the terminal); you can close this page."
    return f"All decisions are recorded; you can close this page. Continue the run with: atelier resume {run_id}"


def _page_error(message: str) -> str:
    """``decide``'s messages name the CLI's options; on the page they name its fields."""
    for option, field in (("--keep and --reject", "keep and reject"), ("--keep", "keep"), ("--reject", "reject"),
                          ("--star", "stars"), ("--note", "note"), ("--accept", "keep")):
        message = message.replace(option, field)
    return message


class _Review:
    """What the server knows: the run, its token, the open gates, the decisions recorded so far."""

    def __init__(self, store: Any, run_id: str, deliverable: str | None, by: str, resumes: bool) -> None:
        self.store, self.run_id, self.deliverable, self.by, self.resumes = store, run_id, deliverable, by, resumes
        self.token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.decided: list[int] = []
        self.finished = threading.Event()
        self.port = 0
        home = getattr(store, "home", None)
        self.thumb = Thumbnails(lambda p: Path(p), thumbs_dir(home) if home is not None else None)
        self.images: dict[tuple[str, int], str] = {}  # (decision, number) -> file, of the gates ever shown

    def gates(self) -> list[OpenGate]:
        gates = open_gates(self.store, self.run_id, self.deliverable)
        for g in gates:
            for c in g.candidates:
                self.images[g.decision, c.number] = c.path
        return gates

    def page(self) -> str:
        return render_page(self.run_id, self.gates(), self.token, self.by, self.thumb, self.resumes)

    def decide(self, data: dict) -> dict:
        """Record one gate's decision from a POST's fields; raises ``UsageError`` with a message for the page."""
        decision = data.get("decision")
        if not isinstance(decision, str) or not decision:
            raise UsageError("no gate given (the page's form names one)")
        keep, reject = _number_list(data.get("keep"), "keep"), _number_list(data.get("reject"), "reject")
        note, by = _text(data.get("note"), "note"), _text(data.get("by"), "your name").strip() or self.by
        with self.lock:
            gate = next((g for g in self.gates() if g.decision == decision), None)
            if gate is None:
                raise UsageError(f"this gate is decided already, or is not one of run {self.run_id}; "
                                 "reload the page to see what still awaits review")
            if not keep:
                raise UsageError(f"{gate.deliverable}: keep at least one candidate: click the images to keep, in "
                                 "order (or “keep CLIP's suggestion”)")
            stars = parse_stars(_stars(data.get("stars")), len(gate.candidates))
            review_id = decide(self.store, gate, keep, reject, stars, note, by)
            self.decided.append(review_id)
            rest = self.gates()
        out = {"ok": True, "review": review_id, "deliverable": gate.deliverable, "round": gate.round,
               "kept": keep, "by": by[:64], "remaining": [f"{g.deliverable} (round {g.round})" for g in rest],
               "done": not rest,
               "message": f"Recorded review {review_id} for {gate.deliverable} round {gate.round}: kept "
                          f"{', '.join(f'#{k}' for k in keep)}, by {by[:64]}."
                          + (f" Still awaiting review: {', '.join(g.deliverable for g in rest)}." if rest else "")}
        if not rest:
            out["done_message"] = _done_message(self.run_id, self.resumes)
        return out


def _number_list(value: Any, name: str) -> list[int]:
    """Candidate numbers from JSON (a list, or "3,1") or a form field ("3,1"); checked against the gate by
    ``decide``."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = [t for t in value.replace(" ", ",").split(",") if t]
    if not isinstance(value, list) or len(value) > 1000:
        raise UsageError(f"{name}: expected candidate numbers like 3,1")
    out = []
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int | str):
            raise UsageError(f"{name}: expected candidate numbers like 3,1, got {t!r}")
        try:
            out.append(int(t))
        except ValueError:
            raise UsageError(f"{name}: expected candidate numbers like 3,1, got {t!r}") from None
    return out


def _stars(value: Any) -> list[str] | dict:
    if value is None or value == "":
        return []
    if isinstance(value, dict) and len(value) <= 1000:
        return {str(k): v for k, v in value.items() if v not in (0, None, "", "0")}
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    raise UsageError("stars: expected candidate=stars pairs like 3=5,1=2")


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UsageError(f"{name}: expected text")
    return value


def _handler(review: _Review) -> type[BaseHTTPRequestHandler]:
    prefix = f"/{review.token}/"

    class Handler(BaseHTTPRequestHandler):
        server_version = "atelier-review"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no request log: URLs hold the token
            pass

        # ---------------------------------------------------------------------------------- plumbing
        def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("X-Frame-Options", "DENY")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()

        def _plain(self, status: int, text: str = "") -> None:
            self._send(status, (text or HTTPStatus(status).phrase).encode() + b"\n", "text/plain; charset=utf-8")

        def _json(self, status: int, data: dict) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _html(self, status: int, page: str) -> None:
            csp = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                   "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
            self._send(status, page.encode("utf-8"), "text/html; charset=utf-8", {"Content-Security-Policy": csp})

        def _route(self) -> str | None:
            """The path under the token, or None (then the request was answered 404)."""
            path = self.path.split("?", 1)[0].split("#", 1)[0]
            if not (path.startswith(prefix) and hmac.compare_digest(path[: len(prefix)], prefix)):
                self._plain(HTTPStatus.NOT_FOUND)
                return None
            return path[len(prefix):]

        def _same_origin(self) -> bool:
            """Host (no DNS rebinding) and, where sent, Origin must be this server."""
            allowed = {f"{HOST}:{review.port}", f"localhost:{review.port}"}
            if self.headers.get("Host", "") not in allowed:
                return False
            origin = self.headers.get("Origin")
            return origin is None or origin in {f"http://{a}" for a in allowed}

        # ----------------------------------------------------------------------------------- methods
        def do_GET(self) -> None:  # noqa: N802
            route = self._route()
            if route is None:
                return
            if not self._same_origin():
                return self._plain(HTTPStatus.FORBIDDEN)
            if route == "":
                return self._html(HTTPStatus.OK, review.page())
            if route.startswith("image/"):
                return self._image(route)
            self._plain(HTTPStatus.NOT_FOUND)

        do_HEAD = do_GET  # noqa: N815

        def _image(self, route: str) -> None:
            _, decision, number = (route.split("/") + ["", ""])[:3]
            path = review.images.get((decision, int(number))) if number.isdigit() else None
            if path is None or not Path(path).is_file():
                return self._plain(HTTPStatus.NOT_FOUND)
            kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
            self._send(HTTPStatus.OK, Path(path).read_bytes(),
                       kind.get(Path(path).suffix.lower(), "application/octet-stream"))

        def do_POST(self) -> None:  # noqa: N802
            route = self._route()
            if route is None:
                return
            if route != "decide":
                return self._plain(HTTPStatus.NOT_FOUND)
            if not self._same_origin():
                return self._plain(HTTPStatus.FORBIDDEN)
            kind = self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
            as_json = kind == "application/json"
            if not as_json and kind != "application/x-www-form-urlencoded":
                return self._plain(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send JSON or a form")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                return self._plain(HTTPStatus.LENGTH_REQUIRED)
            if not 0 <= length <= MAX_BODY:
                self.close_connection = True
                return self._plain(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_BODY} bytes")
            raw = self.rfile.read(length)
            try:
                if as_json:
                    data = json.loads(raw.decode("utf-8"))
                else:
                    data = {k: v[-1] for k, v in parse_qs(raw.decode("utf-8"), keep_blank_values=True).items()}
            except (UnicodeDecodeError, ValueError):
                return self._answer(as_json, HTTPStatus.BAD_REQUEST, {"ok": False, "error": "not a decision: "
                                                                                            "cannot read the request"})
            if not isinstance(data, dict) or not isinstance(data.get("token"), str) or not hmac.compare_digest(
                    data["token"].encode(), review.token.encode()):
                return self._plain(HTTPStatus.FORBIDDEN)
            try:
                result = review.decide(data)
            except UsageError as exc:
                return self._answer(as_json, HTTPStatus.BAD_REQUEST, {"ok": False, "error": _page_error(str(exc))})
            except Exception as exc:  # noqa: BLE001 - one line on the page, never a traceback
                return self._answer(as_json, HTTPStatus.INTERNAL_SERVER_ERROR,
                                    {"ok": False, "error": f"could not record the decision: {type(exc).__name__}: "
                                                          f"{str(exc).splitlines()[0] if str(exc) else ''}"})
            self._answer(as_json, HTTPStatus.OK, result)
            if result["done"]:
                review.finished.set()

        def _answer(self, as_json: bool, status: int, data: dict) -> None:
            if as_json:
                return self._json(status, data)
            e = html.escape
            if data["ok"]:
                body = f"<p class='msg ok' id='result'>{e(data['message'])}</p>"
                body += (f"<p id='done' class='shown'>{e(data['done_message'])}</p>" if data["done"]
                         else "<p><a href='./'>back to what still awaits review</a></p>")
            else:
                body = f"<p class='msg error' id='result'>{e(data['error'])}</p><p><a href='./'>back to the page</a>" \
                       "</p>"
            self._html(status, f"<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' "
                               f"href='data:,'><title>atelier · review</title><style>{CSS}</style></head><body>"
                               f"<h1>Review — run {e(review.run_id)}</h1>{body}</body></html>")

        def _refuse(self) -> None:
            if self._route() is not None:
                self._plain(HTTPStatus.METHOD_NOT_ALLOWED)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse  # noqa: N815

    return Handler


def serve_review(store: Any, run_id: str, by: str | None = None, port: int = 0, announce: Callable[[str], Any] = print,
                 open_browser: bool = False, deliverable: str | None = None, resumes: bool = False,
                 timeout: float | None = None, stop: threading.Event | None = None) -> bool:
    """Serve the review page of ``run_id`` on ``http://127.0.0.1:PORT/TOKEN/`` until every open gate is decided,
    Ctrl-C, ``timeout`` seconds or ``stop`` being set; returns whether a decision was recorded.

    ``by``: the name the page proposes (default ``default_reviewer()``); ``port`` 0: a free one; ``announce``:
    where the URL (and the end) is told; ``open_browser``: open it in the default browser, too;
    ``deliverable``: only that deliverable's gates; ``resumes``: the caller resumes the run afterwards (the
    page says so instead of naming ``atelier resume``).
    """
    review = _Review(store, run_id, deliverable, by or default_reviewer(), resumes)
    if not review.gates():
        where = f" for deliverable {deliverable!r}" if deliverable else ""
        announce(f"run {run_id}: nothing awaits review{where}")
        return False
    try:
        server = ThreadingHTTPServer((HOST, port), _handler(review))
    except OSError as exc:
        raise UsageError(f"--port: cannot listen on {HOST}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    review.port = server.server_address[1]
    url = f"http://{HOST}:{review.port}/{review.token}/"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                              name="atelier-review-page")
    thread.start()
    announce(f"review page for run {run_id}:\n{url}\n(open it in a browser on this machine; Ctrl-C stops)")
    if open_browser:
        threading.Thread(target=webbrowser.open, args=(url,), daemon=True).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while not review.finished.wait(0.5):
            if deadline is not None and time.monotonic() >= deadline:
                announce(f"review page for run {run_id}: stopped after {timeout:g}s")
                break
            if stop is not None and stop.is_set():
                announce(f"review page for run {run_id}: stopped")
                break
        else:
            time.sleep(0.3)  # the last answer reaches the browser before the server goes
            announce(f"run {run_id}: all decisions recorded")
    except KeyboardInterrupt:
        announce(f"review page for run {run_id}: stopped"
                 + (f" ({len(review.decided)} decision(s) recorded)" if review.decided else " (nothing decided)"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    return bool(review.decided)
