"""Full-size architectures with random weights (``atelier.fullsize``, ``random:`` sources, ``bench-*`` profiles).

Structure is checked on the ``meta`` device (no memory, no initialisation), so SDXL and FLUX cost
nothing here; one end-to-end draft runs the real SD 1.5 architecture on CPU at 64x64, one step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from atelier import fullsize, profiles, sources
from atelier.cli import app
from atelier.models import Models, process_cache
from stages import draft
from stages.protocol import plan

REPO = Path(__file__).resolve().parent.parent
BENCH = ("bench-sd15-lcm", "bench-sdxl-turbo", "bench-flux-schnell")

# Published parameter counts (num_parameters() of the Hugging Face checkpoints' modules).
PUBLISHED = {
    ("sd15", "unet"): 859_520_964,
    ("sd15", "vae"): 83_653_863,
    ("sd15", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text tower, no projection
    ("sdxl", "unet"): 2_567_463_684,
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP bigG text tower + 1280x1280 projection
    ("flux-schnell", "transformer"): 11_891_178_560,  # FLUX.1-dev 11,901,408,320 minus its guidance embedder
    ("flux-schnell", "vae"): 83_819_683,
    ("flux-schnell", "text_encoder"): 123_060_480,
    ("flux-schnell", "text_encoder_2"): 4_762_310_656,  # T5-v1.1-XXL encoder
}


@pytest.fixture(scope="module")
def meta_networks() -> dict:
    return {name: fullsize.build_networks(name, "meta") for name in fullsize.ARCHITECTURES}


@pytest.mark.parametrize(("arch", "role"), sorted(PUBLISHED))
def test_parameter_counts_match_the_published_models(meta_networks, arch: str, role: str) -> None:
    module = meta_networks[arch][role]
    count = sum(p.numel() for p in module.parameters())
    assert count == pytest.approx(PUBLISHED[(arch, role)], rel=0.005), count
    assert all(p.device.type == "meta" for p in module.parameters())  # nothing allocated


def test_every_network_is_covered(meta_networks) -> None:
    assert {(a, r) for a, nets in meta_networks.items() for r in nets} == set(PUBLISHED)


@pytest.mark.parametrize("name", list(fullsize.ARCHITECTURES))
def test_pipeline_assembles_in_the_requested_dtype(name: str) -> None:
    before = torch.get_default_dtype()
    pipe = fullsize.build_pipeline(name, "meta", torch.bfloat16)
    assert torch.get_default_dtype() == before  # the construction context restores the default dtype
    arch = fullsize.ARCHITECTURES[name]
    assert type(pipe).__name__ == arch.pipeline
    assert type(pipe.scheduler).__name__ == arch.scheduler[0]
    for role in arch.networks:
        params = list(getattr(pipe, role).parameters())
        assert {p.dtype for p in params} == {torch.bfloat16} and {p.device.type for p in params} == {"meta"}
    assert len(pipe.tokenizer("a red bicycle", padding="max_length").input_ids) == 77
    if name == "flux-schnell":  # T5 pads to FluxPipeline's max_sequence_length: the transformer's text tokens
        assert pipe.tokenizer_2.model_max_length == 512
    if name == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"


def test_unknown_architecture_lists_known_names() -> None:
    with pytest.raises(KeyError, match="known: sd15, sdxl, flux-schnell"):
        fullsize.build_pipeline("sd3", "meta")


def test_bench_profiles(tiny_profile) -> None:
    expected = {"bench-sd15-lcm": ("random:sd15", "sd", 4, 1.0, "lcm", 512 * 512, 8),
                "bench-sdxl-turbo": ("random:sdxl", "sdxl", 1, 0.0, "euler-a", 512 * 512, 8),
                "bench-flux-schnell": ("random:flux-schnell", "flux", 4, 0.0, "flow-euler", 1024 * 1024, 4)}
    for name, (source, family, steps, guidance, scheduler, pixels, batch) in expected.items():
        p = profiles.get_profile(name)
        assert p.random_weights
        assert p.draft_model == p.refine_model and p.draft_model.source == source
        assert p.draft_model.family == family == fullsize.ARCHITECTURES[source.removeprefix("random:")].family
        d = p.draft
        assert (d.steps, d.guidance, d.scheduler, d.pixels, d.batch_size) == (steps, guidance, scheduler, pixels, batch)
        for role in ("ip_adapter", "clip", "face", "upscale"):
            assert getattr(p, role) == getattr(tiny_profile, role)
    sdxl = profiles.get_profile("bench-sdxl-turbo").refine
    assert (sdxl.steps, sdxl.scheduler, sdxl.pixels) == (30, "dpm++-2m-karras", 1024 * 1024)


def test_random_sources_are_available_and_identified_without_torch(tmp_path: Path) -> None:
    """available() / identity() read configs only: no torch import, no GB hashed, no file written but the cache dir."""
    code = (
        "import json, sys; from pathlib import Path; from atelier import sources as r;"
        "from atelier.profiles import get_profile;"
        "specs = [get_profile(n).draft_model for n in " + repr(BENCH) + "];"
        f"m = Path({str(tmp_path / 'models')!r});"
        "print(json.dumps({'available': [r.available(s, m) for s in specs], 'ids': [r.identity(s, m) for s in specs],"
        "                  'torch': 'torch' in sys.modules}))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert not out["torch"]
    assert all(ok and "random weights" in where for ok, where in out["available"])
    ids = out["ids"]
    assert all(i["random_weights"] and len(i["config_sha256"]) == 64 and i["seed"] == fullsize.SEED for i in ids)
    assert "weights_sha256" not in ids[0]
    assert len({i["config_sha256"] for i in ids}) == 3
    assert ids[0]["config_sha256"] == fullsize.config_sha256("sd15")  # stable across processes


def test_unknown_random_source_is_unavailable_and_has_no_files(tmp_path: Path) -> None:
    spec = profiles.ModelSpec("x", "diffusers", "random:sd3", family="sd")
    ok, where = sources.available(spec, tmp_path)
    assert not ok and "known: sd15, sdxl, flux-schnell" in where
    with pytest.raises(ValueError, match="built in memory"):
        sources.resolve(profiles.get_profile("bench-sd15-lcm").draft_model, tmp_path)


def test_models_command_shows_the_bench_profiles_available(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["models", "--json", "--home", str(tmp_path / "home")])
    assert res.exit_code == 0, res.output
    rows = [r for r in json.loads(res.output) if r["profile"] in BENCH]
    assert {r["profile"] for r in rows} == set(BENCH)
    assert all(r["available"] for r in rows if r["source"].startswith("random:"))


@pytest.mark.slow  # a full-size SD 1.5 on CPU
def test_full_size_sd15_drafts_end_to_end_on_cpu(models_dir: Path) -> None:
    """The real SD 1.5 architecture (1.07 B parameters, fp32 on CPU) through ``Models`` and the draft
    stage, at the smallest cost: 64x64, one LCM step (~10 s on 2 cores, mostly weight initialisation)."""
    spec = profiles.get_profile("bench-sd15-lcm").draft_model
    rng = torch.random.get_rng_state()
    try:
        req = draft.DraftRequest(prompt="a red bicycle", negative="", width=64, height=64, steps=1, guidance=1.0,
                                 scheduler="lcm", model=spec, seeds=(3,), indices=(0,), batch_size=1)
        models = Models.at(models_dir)
        out = draft.generate_drafts(req, models)
        pipe = models.text2image(spec)
        assert sum(p.numel() for p in pipe.unet.parameters()) == PUBLISHED[("sd15", "unet")]
        assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
        assert type(pipe.scheduler).__name__ == "LCMScheduler"
        [item] = plan(draft.STAGE, req, models.identity)  # output i is the item the plan keys with seed i
        assert len(out) == 1 and out[0].image.size == (64, 64) and item.recipe["seed"] == 3
        assert torch.equal(torch.random.get_rng_state(), rng)  # building seeded the weights in a forked RNG
    finally:  # 4 GB of fp32 weights: do not keep them cached for the rest of the session
        process_cache().drop(lambda key: spec.source in key)
