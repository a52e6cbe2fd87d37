"""Together images through the official ``together`` client, pointed at a local stand-in (``base_url``).

The failure modes the other backends are tested for: 429 + Retry-After then success, 500 then success,
moderation refusal, auth error, malformed JSON, slow past the timeout, base64 vs URL results (and an
expired URL); the key never shows up in an error, a fact or a log line.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from PIL import Image

from atelier import backends as B
from tests.standins import TogetherStandIn, png_bytes

TOGETHER_KEY = "tgp_v1_atelierFAKEtogether9d3c7b1e5f"
FAST = B.RetryPolicy(attempts=4, base_delay=0.01, max_delay=5)
SCHNELL = "black-forest-labs/FLUX.1-schnell"


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", TOGETHER_KEY)
    for var in ("TOGETHER_BASE_URL", "ATELIER_PRICES", "TOGETHER_API_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with TogetherStandIn(TOGETHER_KEY) as s:
        yield s


def target(server, model=SCHNELL, **options):
    return B.parse_source(f"together:{model}", options, base_url=server.url)


def run(t, req, **kw):
    waits: list[float] = []
    return B.generate(t, req, FAST, sleep=waits.append, **kw), waits


def size_of(img: B.RemoteImage) -> tuple[int, int]:
    with Image.open(io.BytesIO(img.data)) as im:
        return im.size


def test_together_base64_results_and_what_was_sent(server):
    out, waits = run(target(server, steps=4), B.RemoteRequest("a red lighthouse", "blurry", 500, 300, seed=7, n=2))
    assert len(out) == 2 and not waits and out[0].data != out[1].data
    assert all(o.mime == "image/png" for o in out) and size_of(out[0]) == (496, 304)  # snapped to 16 px
    (req,) = server.api_requests()
    assert req.path == "/v1/images/generations" and req.headers["authorization"] == f"Bearer {TOGETHER_KEY}"
    assert req.body == {"model": SCHNELL, "prompt": "a red lighthouse", "width": 496, "height": 304, "n": 2,
                        "output_format": "png", "response_format": "base64", "seed": 7, "steps": 4,
                        "negative_prompt": "blurry"}
    facts = out[0].facts
    assert facts["backend"] == "together" and facts["model"] == SCHNELL and facts["deterministic"] is False
    assert facts["request_id"].endswith("-LAX") and facts["size"] == [496, 304]
    assert facts["usd"] == round(0.0027 * 496 * 304 / 1e6, 6) and facts["price_table"] == "2025-06"
    assert facts["params_sent"]["arguments"]["seed"] == 7 and facts["params_sent"]["strength_sent"] is None
    assert B.estimate(target(server), B.RemoteRequest("x", width=500, height=300, n=2)) == pytest.approx(2 * facts["usd"])
    assert TOGETHER_KEY not in json.dumps(facts)


def test_together_url_results_are_downloaded_at_once_without_credentials(server):
    out, _ = run(target(server, response_format="url", output_format="jpeg"), B.RemoteRequest("a boat", width=512, height=512))
    assert out[0].mime == "image/jpeg" and size_of(out[0]) == (512, 512)
    downloads = [r for r in server.requests if r.path.startswith("/files/")]
    assert len(downloads) == 1 and "authorization" not in downloads[0].headers


def test_together_expired_result_url_fails_at_once(server):
    server.expired = True
    with pytest.raises(B.BackendError, match="result URL expired") as err:
        run(target(server, response_format="url"), B.RemoteRequest("a boat", width=512, height=512))
    assert err.value.kind == "expired" and len(server.api_requests()) == 1


def test_together_image_to_image_sends_the_init_image_as_a_data_uri(server):
    init = png_bytes(64, 64, "draft")
    out, _ = run(target(server, "black-forest-labs/FLUX.1-kontext-dev"),
                 B.RemoteRequest("a boat, detailed", width=512, height=512, init_image=init, strength=0.5))
    body = server.api_requests()[0].body
    assert body["image_url"].startswith("data:image/png;base64,") and "strength" not in body
    assert out[0].facts["params_sent"]["arguments"]["image_url"] == f"<init image, {len(init)} bytes>"
    assert out[0].facts["usd"] is None  # no price table for it: unknown, not free


def test_together_429_with_retry_after_then_success(server):
    server.fault("429", retry_after="2")
    retried = []
    out, waits = run(target(server), B.RemoteRequest("a boat", width=512, height=512),
                     on_retry=lambda e, d: retried.append(e.kind))
    assert len(out) == 1 and waits == [2.0] and retried == ["rate-limited"] and len(server.api_requests()) == 2


def test_together_500_is_retried_with_backoff_then_gives_up(server):
    server.fault("500", times=2)
    out, waits = run(target(server), B.RemoteRequest("a boat", width=512, height=512))
    assert len(out) == 1 and len(waits) == 2 and waits[1] > waits[0]
    server.requests.clear()
    server.fault("500", times=10)
    with pytest.raises(B.BackendError, match="server error: HTTP 500: Internal server error") as err:
        run(target(server), B.RemoteRequest("a boat", width=512, height=512))
    assert err.value.kind == "server" and len(server.api_requests()) == FAST.attempts


def test_together_moderation_refusal_fails_at_once_with_one_line(server):
    with pytest.raises(B.BackendError) as err:
        run(target(server), B.RemoteRequest("a FORBIDDEN thing", width=512, height=512), context="deliverable poster")
    e = err.value
    assert e.kind == "refused" and not e.retryable and len(server.api_requests()) == 1
    assert str(e).startswith(f"together:{SCHNELL} for deliverable poster: refused by the provider's moderation: HTTP 422")
    assert "NSFW" in str(e) and "\n" not in str(e)


def test_together_bad_request_is_not_a_refusal(server):
    with pytest.raises(B.BackendError, match="bad request: HTTP 400: width and height must be multiples") as err:
        run(target(server, input={"width": 1000}), B.RemoteRequest("a boat", width=512, height=512))
    assert err.value.kind == "bad-request" and len(server.api_requests()) == 1


def test_together_auth_error_never_echoes_the_key(monkeypatch, server):
    monkeypatch.setenv("TOGETHER_API_KEY", "tgp_v1_WRONG_key_000000")
    with pytest.raises(B.BackendError) as err:
        run(target(server), B.RemoteRequest("a boat", width=512, height=512))
    assert err.value.kind == "auth" and len(server.api_requests()) == 1
    assert "tgp_v1_WRONG_key_000000" not in str(err.value) and "invalid_api_key" in str(err.value)


def test_together_missing_key_fails_before_sending(monkeypatch, server):
    monkeypatch.delenv("TOGETHER_API_KEY")
    assert not B.available(f"together:{SCHNELL}")[0]
    with pytest.raises(B.BackendError, match="set TOGETHER_API_KEY") as err:
        run(target(server), B.RemoteRequest("a boat"))
    assert err.value.kind == "config" and not server.requests


def test_together_timeout_is_not_retried(server):
    server.fault("slow", delay=3)
    with pytest.raises(B.BackendError, match="timed out: no response within 1 s") as err:
        run(target(server), B.RemoteRequest("a boat", width=512, height=512, timeout=1))
    assert err.value.kind == "timeout" and len(server.api_requests()) == 1


def test_together_malformed_json_fails_at_once(server):
    server.fault("malformed")
    with pytest.raises(B.BackendError) as err:
        run(target(server), B.RemoteRequest("a boat", width=512, height=512))
    assert err.value.kind == "malformed" and len(server.api_requests()) == 1


def test_together_base_url_from_the_clients_own_setting(monkeypatch, server):
    monkeypatch.setenv("TOGETHER_BASE_URL", server.url)
    out, _ = run(B.parse_source(f"together:{SCHNELL}"), B.RemoteRequest("a boat", width=256, height=256))
    assert len(out) == 1 and len(server.api_requests()) == 1


def test_together_key_appears_in_no_error_fact_or_log_line(monkeypatch, caplog, server):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TOGETHER_LOG", "debug")
    seen = [json.dumps(o.facts) for o in run(target(server), B.RemoteRequest("a boat", width=256, height=256))[0]]
    for fault in ("429", "500", "malformed"):
        server.fault(fault, times=FAST.attempts)
        with pytest.raises(B.BackendError) as err:
            run(target(server), B.RemoteRequest("a boat", width=256, height=256))
        seen += [str(err.value), repr(err.value), err.value.detail]
    blob = "\n".join(seen + [r.getMessage() for r in caplog.records] + [caplog.text])
    assert "rate limited" in blob and TOGETHER_KEY not in blob
