"""Remote backends against local stand-in servers: the official clients run for real, pointed at 127.0.0.1.

Every failure mode the issue names: 429 + Retry-After then success, 500 then success, moderation refusal,
auth error, expired result URL, slow past the timeout, malformed JSON; and the key never shows up in an
error, a fact or a log line.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from PIL import Image

from atelier import backends as B
from atelier.backends import prices
from atelier.backends.common import nearest_size, retry_after
from tests.standins import ComfyUIStandIn, OpenAIStandIn, ReplicateStandIn, comfy_workflow, png_bytes

OPENAI_KEY = "sk-atelier-FAKE-openai-7c1e9d2b5a3f"
REPLICATE_KEY = "r8_atelierFAKEreplicate4e8a0c6d"
FAST = B.RetryPolicy(attempts=4, base_delay=0.01, max_delay=5)


@pytest.fixture(autouse=True)
def keys(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_KEY)
    for var in ("OPENAI_BASE_URL", "REPLICATE_BASE_URL", "ATELIER_COMFYUI_URL", "ATELIER_PRICES"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def openai_server():
    with OpenAIStandIn(OPENAI_KEY) as s:
        yield s


@pytest.fixture
def replicate_server():
    with ReplicateStandIn(REPLICATE_KEY) as s:
        yield s


@pytest.fixture
def comfy_server():
    with ComfyUIStandIn() as s:
        yield s


def run(target, req, policy=FAST, **kw):
    """generate(), with the waits recorded instead of slept."""
    waits: list[float] = []
    out = B.generate(target, req, policy, sleep=waits.append, **kw)
    return out, waits


def decoded(img: B.RemoteImage) -> Image.Image:
    with Image.open(io.BytesIO(img.data)) as im:
        im.load()
        return im


# ------------------------------------------------------------------------------------------ common
def test_retry_after_reads_seconds_milliseconds_and_dates():
    assert retry_after({"Retry-After": "3"}) == 3
    assert retry_after({"retry-after-ms": "250"}) == 0.25
    assert retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0  # in the past: no wait
    assert retry_after({"Retry-After": "soon"}) is None
    assert retry_after({}) is None


def test_nearest_size_keeps_the_aspect():
    sizes = [(1024, 1024), (1536, 1024), (1024, 1536)]
    assert nearest_size(512, 512, sizes) == (1024, 1024)
    assert nearest_size(768, 512, sizes) == (1536, 1024)
    assert nearest_size(600, 1000, sizes) == (1024, 1536)


def test_price_tables_know_sizes_and_qualities_and_can_be_overridden(tmp_path, monkeypatch):
    assert prices.estimate("openai:gpt-image-1", 1024, 1536, "high") == (0.25, "2025-06")
    assert prices.estimate("replicate:black-forest-labs/flux-schnell", 512, 512)[0] == 0.003
    assert prices.estimate("comfyui:http://studio:8188", 512, 512)[0] == 0.0
    assert prices.estimate("replicate:someone/unknown-model", 512, 512) == (None, "")  # unknown is not free
    table = tmp_path / "prices.json"
    table.write_text(json.dumps({"openai:gpt-image-1": {"taken": "2026-11-30", "per_image": {"low": 0.005}},
                                 "replicate:someone/unknown-model": {"taken": "2026-11-30", "per_megapixel": 0.01}}))
    monkeypatch.setenv("ATELIER_PRICES", str(table))
    assert prices.estimate("openai:gpt-image-1", 1024, 1024, "low") == (0.005, "2026-11-30")
    assert prices.estimate("replicate:someone/unknown-model", 1000, 1000) == (0.01, "2026-11-30")


def test_sources_parse_and_unknown_backends_list_the_known_ones():
    t = B.parse_source("replicate:black-forest-labs/flux-schnell", {"input": {"go_fast": False}})
    assert (t.backend, t.model, t.source) == ("replicate", "black-forest-labs/flux-schnell",
                                              "replicate:black-forest-labs/flux-schnell")
    with pytest.raises(KeyError, match="known: openai, replicate, comfyui, fal"):
        B.parse_source("midjourney:v7")
    with pytest.raises(ValueError, match="<backend>:<model>"):
        B.parse_source("openai")


def test_available_means_the_key_is_set(monkeypatch, tmp_path):
    assert B.available("openai:gpt-image-1")[0]
    monkeypatch.delenv("OPENAI_API_KEY")
    ok, why = B.available("openai:gpt-image-1")
    assert not ok and "OPENAI_API_KEY" in why
    key_file = tmp_path / "key"
    key_file.write_text(OPENAI_KEY + "\n")
    monkeypatch.setenv("OPENAI_API_KEY_FILE", str(key_file))
    assert B.available("openai:gpt-image-1")[0]
    assert B.available("comfyui:http://127.0.0.1:8188")[0]  # no key needed


def test_a_missing_key_fails_at_once_naming_the_variable(monkeypatch, openai_server):
    monkeypatch.delenv("OPENAI_API_KEY")
    target = B.parse_source("openai:gpt-image-1", base_url=openai_server.url + "/v1")
    with pytest.raises(B.BackendError, match="set OPENAI_API_KEY") as err:
        run(target, B.RemoteRequest("a lighthouse"))
    assert err.value.kind == "config" and not openai_server.requests


def test_the_key_can_come_from_a_file(monkeypatch, tmp_path, openai_server):
    monkeypatch.delenv("OPENAI_API_KEY")
    (tmp_path / "key").write_text(OPENAI_KEY + "\n")
    monkeypatch.setenv("OPENAI_API_KEY_FILE", str(tmp_path / "key"))
    out, _ = run(B.parse_source("openai:gpt-image-1", base_url=openai_server.url + "/v1"), B.RemoteRequest("a boat"))
    assert len(out) == 1


# ------------------------------------------------------------------------------------------ OpenAI
def openai_target(server, model="gpt-image-1", **options):
    return B.parse_source(f"openai:{model}", options, base_url=server.url + "/v1")


def test_openai_generates_base64_images_and_records_what_was_sent(openai_server):
    out, waits = run(openai_target(openai_server, quality="low"),
                     B.RemoteRequest("a red lighthouse", "blurry", width=512, height=768, seed=7, n=2))
    assert len(out) == 2 and not waits
    assert decoded(out[0]).size == (1024, 1536)  # the supported size closest in aspect to 512x768
    assert out[0].mime == "image/png" and out[0].data != out[1].data
    facts = out[0].facts
    assert facts["backend"] == "openai" and facts["model"] == "gpt-image-1"
    assert facts["request_id"].startswith("req_") and facts["deterministic"] is False
    assert facts["usd"] == 0.016 and facts["price_table"] == "2025-06"
    sent = facts["params_sent"]
    assert sent["size"] == "1024x1536" and sent["quality"] == "low" and sent["n"] == 2
    assert sent["seed_sent"] is None and sent["prompt"] == "a red lighthouse\nAvoid: blurry"
    (req,) = openai_server.api_requests()
    assert req.path == "/v1/images/generations" and req.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert req.body == {"model": "gpt-image-1", "prompt": "a red lighthouse\nAvoid: blurry", "n": 2, "size": "1024x1536",
                        "quality": "low"}
    assert json.dumps(facts).find(OPENAI_KEY) == -1


def test_openai_refines_through_images_edit_with_the_init_image(openai_server):
    init = png_bytes(64, 64, "draft")
    out, _ = run(openai_target(openai_server, quality="high"),
                 B.RemoteRequest("a red lighthouse, detailed", width=1024, height=1024, init_image=init, strength=0.5))
    (req,) = openai_server.api_requests()
    assert req.path == "/v1/images/edits"
    assert req.body["image"]["content"] == init and req.body["prompt"] == "a red lighthouse, detailed"
    assert out[0].facts["params_sent"]["endpoint"] == "images.edit"
    assert out[0].facts["params_sent"]["strength_sent"] is None  # the API takes none: said, not hidden
    assert out[0].facts["usd"] == 0.167


def test_openai_dall_e_asks_for_base64(openai_server):
    out, _ = run(openai_target(openai_server, "dall-e-3", quality="standard"), B.RemoteRequest("a boat", width=1800, height=1000))
    assert openai_server.api_requests()[0].body["response_format"] == "b64_json"
    assert out[0].facts["params_sent"]["size"] == "1792x1024" and out[0].facts["usd"] == 0.08


def test_openai_429_with_retry_after_then_success(openai_server):
    openai_server.fault("429", retry_after="2")
    retried = []
    out, waits = run(openai_target(openai_server), B.RemoteRequest("a boat"), on_retry=lambda e, d: retried.append(e.kind))
    assert len(out) == 1 and waits == [2.0] and retried == ["rate-limited"]
    assert len(openai_server.api_requests()) == 2


def test_openai_500_is_retried_with_backoff(openai_server):
    openai_server.fault("500", times=2)
    out, waits = run(openai_target(openai_server), B.RemoteRequest("a boat"))
    assert len(out) == 1 and len(waits) == 2 and waits[1] > waits[0]  # exponential
    assert len(openai_server.api_requests()) == 3


def test_openai_rate_limit_gives_up_after_the_policy(openai_server):
    openai_server.fault("429", times=10)
    with pytest.raises(B.BackendError, match="rate limited") as err:
        run(openai_target(openai_server), B.RemoteRequest("a boat"), context="deliverable hero-banner")
    assert len(openai_server.api_requests()) == FAST.attempts
    assert "hero-banner" in str(err.value)


def test_openai_retry_after_longer_than_the_policy_fails_now(openai_server):
    openai_server.fault("429", retry_after="3600")
    with pytest.raises(B.BackendError) as err:
        run(openai_target(openai_server), B.RemoteRequest("a boat"))
    assert err.value.retry_after == 3600 and len(openai_server.api_requests()) == 1


def test_openai_moderation_refusal_fails_at_once_with_one_clear_line(openai_server):
    with pytest.raises(B.BackendError) as err:
        run(openai_target(openai_server), B.RemoteRequest("a FORBIDDEN thing"), context="deliverable hero-banner")
    e = err.value
    assert e.kind == "refused" and not e.retryable and len(openai_server.api_requests()) == 1
    line = str(e)
    assert "\n" not in line
    assert line.startswith("openai:gpt-image-1 for deliverable hero-banner: refused by the provider's moderation")
    assert "moderation_blocked" in line and "safety system" in line and "(request req_" in line


def test_openai_auth_error_fails_at_once_and_never_echoes_the_key(monkeypatch, openai_server):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-atelier-WRONG-key-0000000000")
    with pytest.raises(B.BackendError) as err:
        run(openai_target(openai_server), B.RemoteRequest("a boat"))
    assert err.value.kind == "auth" and len(openai_server.api_requests()) == 1
    assert "sk-atelier-WRONG-key-0000000000" not in str(err.value)  # the stand-in echoed it whole
    assert "invalid_api_key" in str(err.value)


def test_openai_timeout(openai_server):
    openai_server.fault("slow", delay=3)
    with pytest.raises(B.BackendError, match="timed out: no response within 1 s") as err:
        run(openai_target(openai_server), B.RemoteRequest("a boat", timeout=1))
    assert err.value.kind == "timeout" and len(openai_server.api_requests()) == 1  # not retried: it may have been charged


def test_openai_malformed_json_fails_at_once(openai_server):
    openai_server.fault("malformed")
    with pytest.raises(B.BackendError) as err:
        run(openai_target(openai_server), B.RemoteRequest("a boat"))
    assert err.value.kind == "malformed" and len(openai_server.api_requests()) == 1


# ------------------------------------------------------------------------------------------ Replicate
def replicate_target(server, model="black-forest-labs/flux-schnell", **options):
    return B.parse_source(f"replicate:{model}", {"poll_interval": 0.05, **options}, base_url=server.url)


def test_replicate_list_output_is_downloaded_at_once_without_credentials(replicate_server):
    out, _ = run(replicate_target(replicate_server), B.RemoteRequest("a red lighthouse", width=768, height=512, seed=42, n=2))
    assert len(out) == 2 and all(o.mime == "image/png" for o in out)
    create = replicate_server.api_requests()[0]
    assert create.path == "/v1/models/black-forest-labs/flux-schnell/predictions"
    assert create.headers["prefer"] == "wait=60" and create.headers["authorization"] == f"Bearer {REPLICATE_KEY}"
    assert create.body["input"] == {"prompt": "a red lighthouse", "aspect_ratio": "3:2", "output_format": "png", "seed": 42,
                                    "num_outputs": 2}
    downloads = [r for r in replicate_server.requests if r.path.startswith("/delivery/")]
    assert len(downloads) == 2 and all("authorization" not in r.headers for r in downloads)
    facts = out[0].facts
    assert facts["backend"] == "replicate" and facts["model"] == "black-forest-labs/flux-schnell"
    assert facts["request_id"] == create_id(replicate_server) and facts["version"] == "hidden"
    assert facts["usd"] == 0.003 and facts["deterministic"] is False
    assert facts["params_sent"]["input"]["seed"] == 42


def create_id(server):
    return next(iter(server.predictions))


def test_replicate_single_output_models(replicate_server):
    out, _ = run(replicate_target(replicate_server, "black-forest-labs/flux-1.1-pro"), B.RemoteRequest("a boat"))
    assert len(out) == 1 and out[0].facts["usd"] == 0.04
    assert isinstance(replicate_server.predictions[create_id(replicate_server)]["output"], str)


def test_replicate_versioned_models_use_the_predictions_endpoint(replicate_server):
    out, _ = run(replicate_target(replicate_server, "stability-ai/sdxl:7762fd07cf82c948538e41f63f77d685e02b063e"),
                 B.RemoteRequest("a boat"))
    create = replicate_server.api_requests()[0]
    assert create.path == "/v1/predictions" and create.body["version"] == "7762fd07cf82c948538e41f63f77d685e02b063e"
    assert out[0].facts["version"] == "7762fd07cf82c948538e41f63f77d685e02b063e"
    assert out[0].facts["usd"] is None  # no price table for it: unknown, not free


def test_replicate_polls_a_prediction_still_processing(replicate_server):
    replicate_server.processing_polls = 2
    out, _ = run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert len(out) == 1
    gets = [r for r in replicate_server.api_requests() if r.method == "GET"]
    assert len(gets) == 3


def test_replicate_img2img_sends_a_data_uri_and_the_strength(replicate_server):
    init = png_bytes(32, 32, "draft")
    out, _ = run(replicate_target(replicate_server, "black-forest-labs/flux-dev"),
                 B.RemoteRequest("a boat", init_image=init, strength=0.6))
    inp = replicate_server.api_requests()[0].body["input"]
    assert inp["image"].startswith("data:image/png;base64,") and inp["prompt_strength"] == 0.6
    assert out[0].facts["params_sent"]["input"]["image"] == f"<init image, {len(init)} bytes>"


def test_replicate_429_then_success(replicate_server):
    replicate_server.fault("429", retry_after="1")
    out, waits = run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert len(out) == 1 and waits == [1.0]


def test_replicate_500_then_success(replicate_server):
    replicate_server.fault("500")
    out, waits = run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert len(out) == 1 and len(waits) == 1


def test_replicate_nsfw_failure_is_a_refusal(replicate_server):
    with pytest.raises(B.BackendError) as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a FORBIDDEN thing"), context="deliverable poster")
    assert err.value.kind == "refused" and len(replicate_server.api_requests()) == 1
    assert str(err.value).startswith("replicate:black-forest-labs/flux-schnell for deliverable poster: refused")
    assert "NSFW content detected" in str(err.value)


def test_replicate_bad_input_is_a_bad_request(replicate_server):
    with pytest.raises(B.BackendError, match="Input validation failed") as err:
        run(replicate_target(replicate_server, input={"aspect_ratio": "7:5"}), B.RemoteRequest("a boat"))
    assert err.value.kind == "bad-request" and len(replicate_server.api_requests()) == 1


def test_replicate_auth_error(monkeypatch, replicate_server):
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_wrong")
    with pytest.raises(B.BackendError, match="authentication failed: HTTP 401") as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert err.value.kind == "auth" and len(replicate_server.api_requests()) == 1


def test_replicate_expired_result_url(replicate_server):
    replicate_server.expired = True
    with pytest.raises(B.BackendError, match="result URL expired") as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert err.value.kind == "expired" and len(replicate_server.api_requests()) == 1


def test_replicate_slow_response_past_the_timeout(replicate_server):
    replicate_server.fault("slow", delay=4)
    with pytest.raises(B.BackendError) as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a boat", timeout=1))
    assert err.value.kind == "timeout"


def test_replicate_prediction_past_the_timeout_is_cancelled(replicate_server):
    replicate_server.processing_polls = 10**6
    with pytest.raises(B.BackendError, match="prediction still processing") as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a boat", timeout=1))
    assert err.value.kind == "timeout" and err.value.request_id
    assert replicate_server.predictions[err.value.request_id]["status"] == "canceled"


def test_replicate_malformed_json(replicate_server):
    replicate_server.fault("malformed")
    with pytest.raises(B.BackendError) as err:
        run(replicate_target(replicate_server), B.RemoteRequest("a boat"))
    assert err.value.kind == "malformed"


# ------------------------------------------------------------------------------------------ ComfyUI
@pytest.fixture
def workflow_file(tmp_path):
    def write(wf=None, name="workflow_api.json"):
        path = tmp_path / name
        path.write_text(json.dumps(wf or comfy_workflow()))
        return str(path)

    return write


def comfy_target(server, workflow, **options):
    return B.parse_source(f"comfyui:{server.url}", {"workflow": workflow, "poll_interval": 0.02, **options})


def test_comfyui_fills_the_workflow_from_its_sampler(comfy_server, workflow_file):
    out, _ = run(comfy_target(comfy_server, workflow_file()), B.RemoteRequest("a red lighthouse", "text", 96, 64, seed=5, n=2))
    assert len(out) == 2 and decoded(out[0]).size == (96, 64)
    sent = comfy_server.api_requests()[0].body["prompt"]
    assert sent["6"]["inputs"]["text"] == "a red lighthouse" and sent["7"]["inputs"]["text"] == "text"
    assert sent["3"]["inputs"]["seed"] == 5
    assert sent["5"]["inputs"] == {"width": 96, "height": 64, "batch_size": 2}
    assert sent["4"] == comfy_workflow()["4"]  # the user's checkpoint is left as saved
    facts = out[0].facts
    assert facts["backend"] == "comfyui" and facts["version"] == "0.3.40" and facts["usd"] == 0.0
    assert facts["model"] == "workflow_api.json" and len(facts["params_sent"]["workflow_sha256"]) == 64
    assert facts["params_sent"]["filled"]["seed"] == {"node": "3", "input": "seed", "value": 5}
    assert facts["request_id"] in comfy_server.prompts


def test_comfyui_named_inputs_by_title(comfy_server, workflow_file):
    run(comfy_target(comfy_server, workflow_file(), inputs={"prompt": "Negative.text", "negative": "Positive.text"}),
        B.RemoteRequest("swapped", "on purpose"))
    sent = comfy_server.api_requests()[0].body["prompt"]
    assert sent["7"]["inputs"]["text"] == "swapped" and sent["6"]["inputs"]["text"] == "on purpose"


def test_comfyui_unknown_named_input_lists_the_nodes(comfy_server, workflow_file):
    with pytest.raises(B.BackendError, match="no node 'Prompt'.*Positive") as err:
        run(comfy_target(comfy_server, workflow_file(), inputs={"prompt": "Prompt.text"}), B.RemoteRequest("x"))
    assert err.value.kind == "config" and not comfy_server.requests


def test_comfyui_img2img_uploads_the_init_image(comfy_server, workflow_file):
    init = png_bytes(80, 48, "draft")
    out, _ = run(comfy_target(comfy_server, workflow_file(comfy_workflow(img2img=True))),
                 B.RemoteRequest("a boat", init_image=init, strength=0.4, seed=1))
    upload, queue = comfy_server.api_requests()[:2]
    assert upload.path == "/upload/image" and upload.body["image"]["content"] == init
    sent = queue.body["prompt"]
    assert sent["10"]["inputs"]["image"] == upload.body["image"]["filename"] and sent["3"]["inputs"]["denoise"] == 0.4
    assert decoded(out[0]).size == (80, 48)


def test_comfyui_node_errors_fail_at_once_naming_the_node(comfy_server, workflow_file):
    wf = comfy_workflow()
    wf["12"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}}
    with pytest.raises(B.BackendError) as err:
        run(comfy_target(comfy_server, workflow_file(wf)), B.RemoteRequest("a boat"))
    assert err.value.kind == "bad-request" and len(comfy_server.api_requests()) == 1
    assert "node 12 (UpscaleModelLoader): Node class 'UpscaleModelLoader' not found" in str(err.value)


def test_comfyui_execution_error(comfy_server, workflow_file):
    comfy_server.execution_error = True
    with pytest.raises(B.BackendError, match="generation failed: node 3 \\(KSampler\\).*out of memory") as err:
        run(comfy_target(comfy_server, workflow_file()), B.RemoteRequest("a boat"))
    assert err.value.kind == "failed"


@pytest.mark.parametrize("websocket", [True, False], ids=["socket", "polling"])
def test_comfyui_waits_for_the_run_then_times_out_and_dequeues(comfy_server, workflow_file, websocket):
    comfy_server.running_polls = 3
    out, _ = run(comfy_target(comfy_server, workflow_file(), websocket=websocket), B.RemoteRequest("a boat"))
    assert len(out) == 1
    sockets = [r for r in comfy_server.requests if r.path == "/ws"]
    histories = [r for r in comfy_server.requests if r.path.startswith("/history/")]
    if websocket:  # told on the socket when it ended: the history is read once
        assert len(sockets) == 1 and len(histories) == 1
        assert sockets[0].body["clientId"] == comfy_server.api_requests()[0].body["client_id"]
    else:
        assert not sockets and len(histories) == 4
    comfy_server.running_polls = 10**6
    with pytest.raises(B.BackendError, match="timed out: not finished after 0.5 s") as err:
        run(comfy_target(comfy_server, workflow_file(), websocket=websocket), B.RemoteRequest("a boat", timeout=0.5))
    assert err.value.request_id not in comfy_server.prompts  # taken off the queue
    assert comfy_server.api_requests()[-1].path == "/queue"


def test_comfyui_500_is_retried_and_malformed_is_not(comfy_server, workflow_file):
    comfy_server.fault("500", path="/prompt")
    out, waits = run(comfy_target(comfy_server, workflow_file()), B.RemoteRequest("a boat"))
    assert len(out) == 1 and len(waits) == 1
    comfy_server.fault("malformed", path="/prompt")
    with pytest.raises(B.BackendError, match="malformed response: POST /prompt") as err:
        run(comfy_target(comfy_server, workflow_file()), B.RemoteRequest("a boat"))
    assert err.value.kind == "malformed"


def test_comfyui_server_url_from_the_environment(monkeypatch, comfy_server, workflow_file):
    monkeypatch.setenv("ATELIER_COMFYUI_URL", comfy_server.url)
    target = B.parse_source("comfyui:http://studio.invalid:8188", {"workflow": workflow_file(), "poll_interval": 0.02})
    out, _ = run(target, B.RemoteRequest("a boat"))
    assert len(out) == 1


def test_comfyui_rejects_a_ui_format_workflow(comfy_server, tmp_path):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"last_node_id": 9, "nodes": [], "links": []}))
    with pytest.raises(B.BackendError, match="not in API format"):
        run(comfy_target(comfy_server, str(ui)), B.RemoteRequest("a boat"))


# ------------------------------------------------------------------------------------------ secrets
def test_the_key_appears_in_no_error_fact_or_log_line(monkeypatch, caplog, openai_server, replicate_server):
    caplog.set_level(logging.DEBUG)  # the clients' own debug logs included (httpx, openai, replicate)
    monkeypatch.setenv("OPENAI_LOG", "debug")
    seen: list[str] = []
    o, r = openai_target(openai_server), replicate_target(replicate_server)
    for target, server in ((o, openai_server), (r, replicate_server)):
        out, _ = run(target, B.RemoteRequest("a boat"))
        seen += [json.dumps(x.facts) for x in out]
        for fault in ("429", "500", "malformed"):
            server.fault(fault, times=FAST.attempts)
            with pytest.raises(B.BackendError) as err:
                run(target, B.RemoteRequest("a boat"))
            seen += [str(err.value), repr(err.value), err.value.detail]
        with pytest.raises(B.BackendError) as err:
            run(target, B.RemoteRequest("a FORBIDDEN boat"))
        seen.append(str(err.value))
    seen += [rec.getMessage() for rec in caplog.records] + [caplog.text]
    blob = "\n".join(seen)
    assert "a boat" in blob or "rate limited" in blob  # something was captured
    assert OPENAI_KEY not in blob and REPLICATE_KEY not in blob


# ------------------------------------------------------------------------------------------ money
def test_estimates_before_sending_match_what_is_recorded(openai_server, replicate_server):
    o = openai_target(openai_server, quality="high")
    req = B.RemoteRequest("a boat", width=900, height=600, n=2)
    assert B.estimate(o, req) == 0.5  # 1536x1024 high, twice
    out, _ = run(o, req)
    assert sum(x.facts["usd"] for x in out) == 0.5
    r = replicate_target(replicate_server)
    assert B.estimate(r, B.RemoteRequest("a boat", n=3)) == pytest.approx(0.009)
    assert B.estimate(B.parse_source("comfyui:http://127.0.0.1:1"), req) == 0.0


def test_costs_count_only_what_the_run_made_and_the_saving_of_cheap_drafts():
    from atelier.backends.costs import CostRow, summarize

    def remote(usd):
        return {"remote": {"usd": usd}}

    rows = [CostRow(f"d{i}", "draft", "hero", remote(0.003), True) for i in range(8)]
    rows += [CostRow("r0", "refine", "hero", remote(0.042), True), CostRow("r1", "refine", "hero", remote(0.042), False),
             CostRow("u0", "upscale", "hero", {"scale": 4}, True), CostRow("x", "refine", "tile", remote(None), True)]
    s = summarize(rows)
    assert s["usd"] == pytest.approx(8 * 0.003 + 0.042) and s["saved_by_reuse"] == 0.042
    assert s["by_stage"] == {"draft": pytest.approx(0.024), "refine": 0.042} and s["unknown_priced"] == 1
    saving = s["drafting_saving"]["hero"]
    assert saving["all_at_refine_price"] == pytest.approx(8 * 0.042)
    assert saving["saving"] == pytest.approx(8 * 0.042 - (0.024 + 0.084))


def test_a_budget_stops_before_the_request_that_would_exceed_it(monkeypatch, replicate_server):
    from atelier.backends.costs import Budget, money
    from atelier.profiles import ModelSpec

    monkeypatch.setenv("REPLICATE_BASE_URL", replicate_server.url)
    spec = ModelSpec("flux", "remote", "replicate:black-forest-labs/flux-schnell", options=(("poll_interval", 0.05),))
    budget = Budget(0.0065)  # two drafts at $0.003, not three
    with pytest.raises(B.BackendError, match=r"stopped before the request: budget \$0.0065: \$0 spent, the next 3 "
                                             r"requests \(~\$0.009\) would exceed it") as err:
        B.generate_items(spec, "a boat", "", 512, 512, (1, 2, 3), concurrency=2, budget=budget, context="draft")
    assert err.value.kind == "budget" and "for draft" in str(err.value)
    assert len(replicate_server.api_requests()) == 0  # all or nothing: not one was sent
    assert len(B.generate_items(spec, "a boat", "", 512, 512, (1, 2), concurrency=2, budget=budget)) == 2
    assert budget.spent_usd == pytest.approx(0.006)
    with pytest.raises(B.BackendError, match=r"\$0.006 spent, the next request \(~\$0.003\)"):
        B.generate_items(spec, "a boat", "", 512, 512, (3,), budget=budget)
    assert len(replicate_server.api_requests()) == 2  # the third was never sent
    assert [money(x) for x in (0, 0.003, 0.05, 0.5, 20, None)] == ["$0", "$0.003", "$0.05", "$0.50", "$20.00", "?"]
    import pickle

    assert pickle.loads(pickle.dumps(budget)).spent_usd == budget.spent_usd
    with pytest.raises(B.BackendError, match="no price table"):
        Budget(10).reserve(None, "replicate:someone/unknown")
