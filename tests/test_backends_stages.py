"""Remote models in the draft and refine stages, their identity and keys, and the hosted profiles: stage
functions called directly (no Prefect) against the stand-in servers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from atelier import backends as B
from atelier.profiles import PROFILES, ModelSpec
from atelier.sources import available, identity, resolve
from stages import draft, refine, vary
from stages.protocol import Input, plan
from tests.standins import ComfyUIStandIn, OpenAIStandIn, ReplicateStandIn, comfy_workflow, png_bytes

OPENAI_KEY = "sk-atelier-FAKE-stages-1b2c3d4e5f60"
REPLICATE_KEY = "r8_atelierFAKEstages9a8b7c6d5e"
FLUX = ModelSpec("flux-schnell-replicate", "remote", "replicate:black-forest-labs/flux-schnell",
                 options=(("poll_interval", 0.05), ("input", (("go_fast", False),))))
GPT = ModelSpec("gpt-image-1", "remote", "openai:gpt-image-1", options=(("quality", "low"),))
GPT_REFS = ModelSpec("gpt-image-1-style-refs", "remote", "openai:gpt-image-1")


@pytest.fixture
def servers(monkeypatch):
    with OpenAIStandIn(OPENAI_KEY) as o, ReplicateStandIn(REPLICATE_KEY) as r:
        monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
        monkeypatch.setenv("REPLICATE_API_TOKEN", REPLICATE_KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", o.url + "/v1")  # the official clients' own settings
        monkeypatch.setenv("REPLICATE_BASE_URL", r.url)
        yield {"openai": o, "replicate": r}


def draft_request(model=FLUX, seeds=(11, 12, 13)):
    return draft.DraftRequest(prompt="a red bicycle", negative="watermark", width=1024, height=576, steps=4, guidance=0.0,
                              scheduler="flow-euler", model=model, seeds=seeds, indices=tuple(range(len(seeds))),
                              batch_size=2)


def refine_request(tmp_path: Path, n=2, model=GPT, ip=GPT_REFS):
    inits, refs = [], []
    for i in range(n):
        p = tmp_path / f"draft{i}.png"
        p.write_bytes(png_bytes(96, 54, f"draft{i}"))
        inits.append(Input(f"draft-key-{i}", p))
    for i in range(2):
        p = tmp_path / f"ref{i}.png"
        p.write_bytes(png_bytes(40, 40, f"ref{i}"))
        refs.append(Input(f"ref-key-{i}", p))
    return refine.RefineRequest(prompt="a red bicycle, golden hour", negative="watermark", width=1024, height=1024, steps=1,
                                guidance=0.0, strength=0.6, scheduler="flow-euler", ip_adapter_scale=0.6, model=model,
                                ip_adapter=ip, style_refs=tuple(refs), inits=tuple(inits),
                                seeds=tuple(range(100, 100 + n)), batch_size=2)


def test_remote_drafts_one_request_per_seed_with_facts(servers):
    outs = draft.generate_drafts(draft_request(), models=None)
    assert len(outs) == 3
    creates = servers["replicate"].api_requests()
    assert sorted(r.body["input"]["seed"] for r in creates) == [11, 12, 13]
    assert all(r.body["input"]["aspect_ratio"] == "16:9" and r.body["input"]["go_fast"] is False for r in creates)
    seeds = [o.facts["remote"]["params_sent"]["input"]["seed"] for o in outs]
    assert seeds == [11, 12, 13]  # in seed order, whatever order the requests finished in
    f = outs[0].facts["remote"]
    assert f["backend"] == "replicate" and f["usd"] == 0.003 and f["deterministic"] is False and f["request_id"]
    assert outs[0].image.mode == "RGB"


def test_remote_refine_sends_the_draft_and_the_style_refs(servers, tmp_path):
    progress = []
    outs = refine.refine(refine_request(tmp_path), models=None, on_progress=lambda d, t: progress.append((d, t)))
    assert len(outs) == 2 and outs[0].image.size == (1024, 1024) and progress[-1] == (2, 2)
    edits = servers["openai"].api_requests()
    assert all(r.path == "/v1/images/edits" for r in edits) and len(edits) == 2
    images = edits[0].body["image[]"]
    assert len(images) == 3  # the draft, then two style references
    f = outs[0].facts["remote"]
    assert f["params_sent"]["style_references_sent"] == 2 and f["usd"] == 0.011


def test_remote_variations_send_each_kept_image_with_the_strength(servers, tmp_path):
    """A variation round on a remote draft model: one image-to-image request per variation, within a budget."""
    from atelier.backends.costs import Budget

    inits = []
    for i in range(2):
        p = tmp_path / f"kept{i}.png"
        p.write_bytes(png_bytes(96, 54, f"kept{i}"))
        inits += [Input(f"kept-key-{i}", p)] * 2
    req = vary.VaryRequest(prompt="a red bicycle", negative="", width=1024, height=576, steps=4, guidance=0.0,
                           strength=0.5, scheduler="flow-euler", round=1, model=FLUX, inits=tuple(inits),
                           seeds=(21, 22, 23, 24), variations=(0, 1, 0, 1), batch_size=2, budget=Budget(0.012))
    outs = vary.vary(req, models=None)
    creates = servers["replicate"].api_requests()
    assert len(outs) == 4 and len(creates) == 4 and req.budget.spent_usd == pytest.approx(0.012)
    assert all(r.body["input"]["prompt_strength"] == 0.5 and r.body["input"]["image"].startswith("data:image/png;base64,")
               for r in creates)
    sent = [o.facts["remote"]["params_sent"] for o in outs]
    assert [x["input"]["seed"] for x in sent] == [21, 22, 23, 24] and sent[0]["input"]["image"].startswith("<init image, ")
    with pytest.raises(B.BackendError, match=r"for vary r1: stopped before the request: budget \$0.01"):
        vary.vary(dataclasses.replace(req, budget=Budget(0.01)), models=None)
    assert len(servers["replicate"].api_requests()) == 4


def test_a_remote_failure_fails_the_stage_with_one_line(servers):
    with pytest.raises(B.BackendError) as err:
        draft.generate_drafts(dataclasses.replace(draft_request(), prompt="a FORBIDDEN bicycle"), models=None)
    assert str(err.value).startswith("replicate:black-forest-labs/flux-schnell for draft seed ")
    assert "refused by the provider's moderation" in str(err.value)


def test_identity_is_backend_model_version_and_settings_never_endpoint_or_key(servers, tmp_path, monkeypatch):
    ident = identity(FLUX, tmp_path)
    assert ident == {"name": "flux-schnell-replicate", "kind": "remote", "source": "replicate:black-forest-labs/flux-schnell",
                     "backend": "replicate", "model": "black-forest-labs/flux-schnell", "version": None,
                     "options": {"input": {"go_fast": False}}}  # poll_interval is runtime: not in it
    pinned = ModelSpec("sdxl", "remote", "replicate:stability-ai/sdxl:7762fd07cf82c948538e41f63f77d685e02b063e")
    assert identity(pinned, tmp_path)["version"] == "7762fd07cf82c948538e41f63f77d685e02b063e"
    keys = lambda spec: [i.key for i in plan(draft.STAGE, draft_request(spec), lambda s: identity(s, tmp_path))]
    base = keys(FLUX)
    monkeypatch.setenv("REPLICATE_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_another_key")
    assert keys(FLUX) == base  # endpoint and key are not what makes the image
    other = ModelSpec(FLUX.name, "remote", FLUX.source, options=(("input", (("go_fast", True),)),))
    assert set(keys(other)).isdisjoint(base)
    assert "r8_" not in json.dumps(identity(FLUX, tmp_path))


def test_comfyui_identity_hashes_the_workflow(tmp_path):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(comfy_workflow()))
    spec = ModelSpec("studio", "remote", "comfyui:http://127.0.0.1:8188", options=(("workflow", str(wf)),))
    first = identity(spec, tmp_path)
    assert first["model"] == "wf.json" and len(first["workflow_sha256"]) == 64 and "workflow" not in first["options"]
    changed = comfy_workflow()
    changed["4"]["inputs"]["ckpt_name"] = "sdxl.safetensors"
    wf.write_text(json.dumps(changed))
    assert identity(spec, tmp_path)["workflow_sha256"] != first["workflow_sha256"]


def test_comfyui_drafts_through_the_stage(tmp_path, monkeypatch):
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(comfy_workflow()))
    with ComfyUIStandIn() as server:
        monkeypatch.setenv("ATELIER_COMFYUI_URL", server.url)
        spec = ModelSpec("studio", "remote", "comfyui:http://studio.invalid:8188",
                         options=(("workflow", str(wf)), ("poll_interval", 0.02)))
        outs = draft.generate_drafts(draft_request(spec, seeds=(5, 6)), models=None)
    assert [o.facts["remote"]["params_sent"]["filled"]["seed"]["value"] for o in outs] == [5, 6]
    assert outs[0].image.size == (1024, 576) and outs[0].facts["remote"]["usd"] == 0.0


def test_available_and_resolve_for_remote_specs(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY_FILE", raising=False)
    ok, why = available(GPT, tmp_path)
    assert not ok and "OPENAI_API_KEY" in why
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    assert available(GPT, tmp_path)[0]
    missing = ModelSpec("studio", "remote", "comfyui:http://127.0.0.1:8188", options=(("workflow", str(tmp_path / "no.json")),))
    assert available(missing, tmp_path) == (False, f"workflow {tmp_path / 'no.json'} does not exist")
    with pytest.raises(ValueError, match="remote backend: it has no weights here"):
        resolve(GPT, tmp_path)


def test_hosted_profiles_name_remote_drafts_and_refine():
    hosted = PROFILES["hosted"]
    assert hosted.draft_model.kind == hosted.refine_model.kind == hosted.ip_adapter.kind == "remote"
    assert hosted.draft_model.source.startswith("replicate:") and hosted.refine_model.source.startswith("openai:")
    mixed = PROFILES["micro-hosted-refine"]
    assert mixed.draft_model.kind == "diffusers" and mixed.refine_model.kind == "remote"
    for prof in (hosted, mixed):
        for spec in (prof.draft_model, prof.refine_model, prof.ip_adapter):
            hash(spec)  # model caches key on specs
            if spec.kind == "remote":
                B.target_of(spec)
