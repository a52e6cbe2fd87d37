"""Remote inpaint (an edit with a mask) against the stand-ins: what each backend is sent, the post-edit stage's
composite (outside the mask the output *is* the source, whatever the provider redrew), keys, and backends that
take no mask refusing before anything is sent. fal's inpainting endpoint is in tests/test_backends_fal.py."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from atelier import backends as B
from atelier.profiles import PROFILES, ModelSpec
from atelier.sources import identity
from stages import postedit
from stages.protocol import Input, plan
from tests.standins import OpenAIStandIn, ReplicateStandIn, TogetherStandIn, png_bytes

OPENAI_KEY = "sk-atelier-FAKE-inpaint-2e4f6a8c0b1d"
REPLICATE_KEY = "r8_atelierFAKEinpaint7f5d3b1a9c"
TOGETHER_KEY = "tgp_v1_atelierFAKEinpaint4c2a"
GPT = ModelSpec("gpt-image-1", "remote", "openai:gpt-image-1", options=(("quality", "low"),))
FILL = ModelSpec("flux-fill-pro-replicate", "remote", "replicate:black-forest-labs/flux-fill-pro",
                 options=(("poll_interval", 0.05),))
LOCAL_IP = PROFILES["micro"].ip_adapter


@pytest.fixture
def servers(monkeypatch):
    with OpenAIStandIn(OPENAI_KEY) as o, ReplicateStandIn(REPLICATE_KEY) as r, TogetherStandIn(TOGETHER_KEY) as t:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_KEY)
        monkeypatch.setenv("TOGETHER_API_KEY", TOGETHER_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", o.url + "/v1")
        monkeypatch.setenv("REPLICATE_BASE_URL", r.url)
        monkeypatch.setenv("TOGETHER_BASE_URL", t.url)
        yield {"openai": o, "replicate": r, "together": t}


def mask_png(size=(96, 54), box=(60, 0, 96, 12)) -> bytes:
    m = Image.new("L", size, 0)
    m.paste(255, box)
    buf = io.BytesIO()
    m.save(buf, "PNG")
    return buf.getvalue()


def inpaint_request(tmp_path, model=GPT, n=2, ip=LOCAL_IP):
    sources, masks = [], []
    mask = tmp_path / "mask.png"
    mask.write_bytes(mask_png())
    for i in range(n):
        p = tmp_path / f"source{i}.png"
        p.write_bytes(png_bytes(96, 54, f"source{i}"))
        sources.append(Input(f"source-key-{i}", p))
        masks.append(Input("mask-key", mask))
    ref = tmp_path / "ref.png"
    ref.write_bytes(png_bytes(40, 40, "ref"))
    return postedit.InpaintRequest(prompt="plain wall", negative="watermark", steps=1, guidance=0.0, strength=1.0,
                                   scheduler="flow-euler", ip_adapter_scale=0.6, multiple=16, model=model, ip_adapter=ip,
                                   style_refs=(Input("ref-key", ref),), sources=tuple(sources), masks=tuple(masks),
                                   seeds=tuple(range(30, 30 + n)), batch_size=2)


def pixels(path_or_image) -> np.ndarray:
    im = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def check_composite(req, outs):
    """Outside the mask each output equals its source exactly; inside, the provider's pixels."""
    inside = pixels(req.masks[0].path)[..., 0] > 127
    for src, out in zip(req.sources, outs):
        a, b = pixels(src.path), pixels(out.image)
        assert out.image.size == Image.open(src.path).size
        assert np.array_equal(a[~inside], b[~inside])
        assert np.abs(a[inside] - b[inside]).mean() > 10  # repainted (the stand-ins redraw everything)


def test_openai_inpaint_sends_the_mask_as_alpha_and_the_stage_composites(servers, tmp_path):
    req = inpaint_request(tmp_path)
    outs = postedit.inpaint(req, models=None)
    check_composite(req, outs)
    edits = servers["openai"].api_requests()
    assert len(edits) == 2 and all(e.path == "/v1/images/edits" for e in edits)
    sent = edits[0].body
    assert Image.open(io.BytesIO(sent["image"]["content"])).size == (96, 54)  # the source as it is
    with Image.open(io.BytesIO(sent["mask"]["content"])) as m:
        assert m.mode == "RGBA" and m.size == (96, 54)
        alpha = np.asarray(m.getchannel("A"))
    assert alpha[0, 95] == 0 and alpha[40, 10] == 255  # transparent = edit (OpenAI's convention), opaque = keep
    assert sent["size"] == "1536x1024" and "Avoid: watermark" in sent["prompt"]
    f = outs[0].facts["remote"]
    assert f["backend"] == "openai" and f["params_sent"]["mask_sent"] is True and f["params_sent"]["endpoint"] == "images.edit"
    assert f["params_sent"]["style_references_sent"] == 0 and f["usd"] == 0.016  # local IP-Adapter role: no refs sent


def test_openai_inpaint_with_remote_style_refs_names_the_image_to_edit(servers, tmp_path):
    outs = postedit.inpaint(inpaint_request(tmp_path, n=1, ip=PROFILES["hosted"].ip_adapter), models=None)
    (edit,) = servers["openai"].api_requests()
    assert len(edit.body["image[]"]) == 2 and "mask" in edit.body
    assert "The first image is the image to edit inside the mask" in edit.body["prompt"]
    assert outs[0].facts["remote"]["params_sent"]["style_references_sent"] == 1


def test_replicate_fill_sends_image_and_mask_and_the_output_follows_the_image(servers, tmp_path):
    req = inpaint_request(tmp_path, model=FILL)
    outs = postedit.inpaint(req, models=None)
    check_composite(req, outs)
    creates = servers["replicate"].api_requests()
    assert [c.path for c in creates] == ["/v1/models/black-forest-labs/flux-fill-pro/predictions"] * 2
    inp = creates[0].body["input"]
    assert inp["image"].startswith("data:image/png;base64,") and inp["mask"].startswith("data:image/png;base64,")
    assert "aspect_ratio" not in inp and "prompt_strength" not in inp and inp["prompt"] == "plain wall"
    assert sorted(c.body["input"]["seed"] for c in creates) == [30, 31]
    f = outs[1].facts["remote"]
    assert f["size"] == [96, 54] and f["usd"] == 0.05 and f["params_sent"]["input"]["mask"].startswith("<mask, ")
    assert f["params_sent"]["input"]["seed"] == 31  # in source order


def test_inpaint_keys_name_the_remote_model(servers, tmp_path):
    req = inpaint_request(tmp_path)
    keys = lambda r: [i.key for i in plan(postedit.INPAINT, r, lambda s: identity(s, tmp_path))]
    base = keys(req)
    assert set(keys(dataclasses.replace(req, model=FILL))).isdisjoint(base)
    assert keys(dataclasses.replace(req, batch_size=7, budget=object())) == base  # how, not what


def test_a_backend_without_masks_refuses_before_sending(servers, tmp_path):
    together = ModelSpec("flux-schnell-together", "remote", "together:black-forest-labs/FLUX.1-schnell")
    with pytest.raises(B.BackendError, match="for inpaint: not configured: this backend takes no inpaint mask; "
                                             "those that do: openai, replicate, fal") as err:
        postedit.inpaint(inpaint_request(tmp_path, model=together), models=None)
    assert err.value.kind == "config" and not servers["together"].requests
    target = B.parse_source("together:black-forest-labs/FLUX.1-schnell")
    with pytest.raises(B.BackendError, match="takes no inpaint mask"):  # and one request on its own, too
        B.generate(target, B.RemoteRequest("x", init_image=png_bytes(32, 32), mask=mask_png((32, 32), (0, 0, 8, 8))))
    assert not servers["together"].requests


def test_a_remote_inpaint_failure_is_one_line_and_a_budget_stops_it(servers, tmp_path):
    from atelier.backends.costs import Budget

    req = dataclasses.replace(inpaint_request(tmp_path, model=FILL), prompt="a FORBIDDEN wall")
    with pytest.raises(B.BackendError) as err:
        postedit.inpaint(req, models=None)
    assert err.value.kind == "refused" and str(err.value).startswith(
        "replicate:black-forest-labs/flux-fill-pro for inpaint seed 3")
    before = len(servers["replicate"].api_requests())
    with pytest.raises(B.BackendError, match=r"budget \$0.09: \$0 spent, the next 2 requests \(~\$0.10\)"):
        postedit.inpaint(dataclasses.replace(req, prompt="plain wall", budget=Budget(0.09)), models=None)
    assert len(servers["replicate"].api_requests()) == before


def test_profiles_name_a_remote_inpaint_model():
    assert PROFILES["hosted"].inpaint_model.source == "openai:gpt-image-1"
    mix = PROFILES["hosted-together"]
    assert mix.draft_model.source == "together:black-forest-labs/FLUX.1-schnell"
    assert mix.inpaint_model.source == "replicate:black-forest-labs/flux-fill-pro"
    assert PROFILES["micro"].inpaint_model is None  # the refine model's inpaint pipeline, as before
    for spec in (mix.draft_model, mix.inpaint_model):
        assert B.backend_module(B.target_of(spec).backend).TAKES_MASK is (spec is mix.inpaint_model)
