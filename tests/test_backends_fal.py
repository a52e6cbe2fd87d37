"""fal's queue through the official fal-client, against an HTTPS stand-in (fal-client speaks nothing else).

fal-client reads its queue host (``FAL_QUEUE_RUN_HOST``) when it is imported: the module fixture sets it, and
the CA of the stand-in's certificate (``SSL_CERT_FILE``), before the first import, or re-imports the client.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from atelier import backends as B
from tests.standins import FalStandIn, png_bytes, tls_context

FAL_KEY = "fal-atelier-FAKE-4f2a9c1e:7b3d5e0a"
FAST = B.RetryPolicy(attempts=3, base_delay=0.01, max_delay=5)


def _reload_fal_client() -> None:
    if "fal_client.client" in sys.modules:
        importlib.reload(sys.modules["fal_client.auth"])
        importlib.reload(sys.modules["fal_client.client"])


@pytest.fixture(scope="module")
def fal_server(tmp_path_factory):
    ctx, ca = tls_context(tmp_path_factory.mktemp("tls"))
    mp = pytest.MonkeyPatch()
    with FalStandIn(FAL_KEY, tls=ctx) as server:
        mp.setenv("FAL_QUEUE_RUN_HOST", server.host)
        mp.setenv("FAL_RUN_HOST", server.host)
        mp.setenv("SSL_CERT_FILE", ca)
        _reload_fal_client()
        yield server
    mp.undo()
    _reload_fal_client()


@pytest.fixture
def fal(fal_server, monkeypatch):
    monkeypatch.setenv("FAL_KEY", FAL_KEY)
    fal_server.requests.clear()
    fal_server.faults.clear()
    fal_server.queued_polls, fal_server.expired = 0, False
    return fal_server


def target(model="fal-ai/flux/schnell", **options):
    return B.parse_source(f"fal:{model}", {"poll_interval": 0.02, **options})


def run(t, req):
    waits: list[float] = []
    return B.generate(t, req, FAST, sleep=waits.append), waits


def test_fal_queue_success_with_facts(fal):
    fal.queued_polls = 2
    out, waits = run(target(), B.RemoteRequest("a red lighthouse", width=96, height=64, seed=9, n=2))
    assert len(out) == 2 and not waits and out[0].mime == "image/png"
    submit = fal.api_requests()[0]
    assert submit.method == "POST" and submit.path == "/fal-ai/flux/schnell"
    assert submit.headers["authorization"] == f"Key {FAL_KEY}"
    assert submit.body == {"prompt": "a red lighthouse", "image_size": {"width": 96, "height": 64}, "num_images": 2,
                           "output_format": "png", "enable_safety_checker": True, "seed": 9}
    assert [r.path.endswith("/status") for r in fal.api_requests()].count(True) >= 3  # queued twice, then completed
    downloads = [r for r in fal.requests if r.path.startswith("/files/")]
    assert len(downloads) == 2 and all("authorization" not in r.headers for r in downloads)
    f = out[0].facts
    assert f["backend"] == "fal" and f["model"] == "fal-ai/flux/schnell" and f["request_id"] in fal.jobs
    assert f["usd"] == pytest.approx(0.003 * 96 * 64 / 1e6, abs=1e-6) and f["seed_returned"] == 9 and f["deterministic"] is False
    assert B.estimate(target(), B.RemoteRequest("x", width=1000, height=1000, n=2)) == pytest.approx(0.006)


def test_fal_img2img_sends_a_data_uri_and_the_strength(fal):
    init = png_bytes(32, 32, "draft")
    out, _ = run(target("fal-ai/flux/dev/image-to-image"), B.RemoteRequest("a boat", init_image=init, strength=0.55,
                                                                           width=64, height=64))
    body = fal.api_requests()[0].body
    assert body["image_url"].startswith("data:image/png;base64,") and body["strength"] == 0.55
    assert out[0].facts["params_sent"]["arguments"]["image_url"] == f"<init image, {len(init)} bytes>"


def test_fal_500_then_success(fal):
    fal.fault("500", path="/fal-ai")
    out, waits = run(target(), B.RemoteRequest("a boat", width=64, height=64))
    assert len(out) == 1 and len(waits) == 1


def test_fal_429_is_retried(fal):
    fal.fault("429", retry_after="0", path="/fal-ai")
    out, _ = run(target(), B.RemoteRequest("a boat", width=64, height=64))
    assert len(out) == 1 and len([r for r in fal.api_requests() if r.method == "POST"]) == 2


def test_fal_flagged_images_are_a_refusal(fal):
    with pytest.raises(B.BackendError, match="refused by the provider's moderation: the safety checker flagged 1 of 1"):
        run(target(), B.RemoteRequest("a FORBIDDEN boat", width=64, height=64))
    assert len([r for r in fal.api_requests() if r.method == "POST"]) == 1
    assert not [r for r in fal.requests if r.path.startswith("/files/")]  # a blanked image is not even fetched


def test_fal_app_error_fails_at_once(fal):
    fal.app_error = ("content_policy_violation", "The prompt was flagged")
    with pytest.raises(B.BackendError) as err:
        run(target(), B.RemoteRequest("a boat", width=64, height=64))
    assert err.value.kind == "refused" and "content_policy_violation" in str(err.value)


def test_fal_bad_request_and_auth(fal, monkeypatch):
    with pytest.raises(B.BackendError, match="bad request: HTTP 422: body.prompt: field required") as err:
        run(target(input={"prompt": ""}), B.RemoteRequest("a boat"))
    assert not err.value.retryable
    monkeypatch.setenv("FAL_KEY", "fal-wrong:key")
    with pytest.raises(B.BackendError, match="authentication failed: HTTP 401") as err:
        run(target(), B.RemoteRequest("a boat"))
    assert "fal-wrong:key" not in str(err.value)


def test_fal_expired_result_url(fal):
    fal.expired = True
    with pytest.raises(B.BackendError) as err:
        run(target(), B.RemoteRequest("a boat", width=64, height=64))
    assert err.value.kind == "expired"


def test_fal_timeout_in_queue_cancels(fal):
    fal.queued_polls = 10**6
    with pytest.raises(B.BackendError, match="timed out: request still in queue after 1 s") as err:
        run(target(), B.RemoteRequest("a boat", width=64, height=64, timeout=1))
    assert fal.jobs[err.value.request_id].get("canceled")


def test_fal_malformed_json(fal):
    fal.fault("malformed", path="/fal-ai")
    with pytest.raises(B.BackendError) as err:
        run(target(), B.RemoteRequest("a boat", width=64, height=64))
    assert err.value.kind == "malformed" and FAL_KEY not in str(err.value)


def test_fal_inpainting_sends_image_and_mask_and_the_stage_composites(fal, tmp_path):
    """An inpainting endpoint through the post-edit stage: image + mask as data URIs, no image_size (the output
    follows the image), the strength; outside the mask the result is the source, byte for byte in pixels."""
    import numpy as np
    from PIL import Image

    from atelier.profiles import PROFILES, ModelSpec
    from stages import postedit
    from stages.protocol import Input

    src, mask = tmp_path / "source.png", tmp_path / "mask.png"
    src.write_bytes(png_bytes(80, 48, "source"))
    m = Image.new("L", (80, 48), 0)
    m.paste(255, (0, 0, 20, 48))
    m.save(mask)
    spec = ModelSpec("flux-inpaint-fal", "remote", "fal:fal-ai/flux-lora/inpainting", options=(("poll_interval", 0.02),))
    req = postedit.InpaintRequest(prompt="plain wall", negative="", steps=1, guidance=0.0, strength=0.9, scheduler="euler",
                                  ip_adapter_scale=0.6, multiple=16, model=spec, ip_adapter=PROFILES["micro"].ip_adapter,
                                  style_refs=(), sources=(Input("s", src),), masks=(Input("m", mask),), seeds=(4,))
    [out] = postedit.inpaint(req, models=None)
    body = next(r for r in fal.api_requests() if r.method == "POST").body
    assert body["image_url"].startswith("data:image/png;base64,") and body["mask_url"].startswith("data:image/png;base64,")
    assert "image_size" not in body and body["strength"] == 0.9 and body["seed"] == 4
    a, b = (np.asarray(im.convert("RGB"), dtype=np.int16) for im in (Image.open(src), out.image))
    keep = np.asarray(m) == 0
    assert np.array_equal(a[keep], b[keep]) and np.abs(a[~keep] - b[~keep]).mean() > 10
    f = out.facts["remote"]
    assert f["params_sent"]["arguments"]["mask_url"].startswith("<mask, ") and f["size"] == [80, 48]
    assert f["usd"] == pytest.approx(0.035 * 80 * 48 / 1e6, abs=1e-6)
