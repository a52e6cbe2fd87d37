"""Model profiles and sources: profiles as data, offline fail-fast, HF-cache loading, LoRAs, schedulers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from atelier import profiles
from atelier.cli import app
from atelier.models import Models
from stages import draft

REPO = Path(__file__).resolve().parent.parent


def _clean_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PREFECT_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", COLUMNS="200")
    return env


def test_unknown_profile_lists_known_names() -> None:
    with pytest.raises(KeyError, match="known: tiny, micro, sd15-lcm"):
        profiles.get_profile("sdxxl")


def test_profiles_cover_the_seed_models() -> None:
    sources = {getattr(p, role).source for p in profiles.PROFILES.values()
               for role in ("draft_model", "refine_model", "ip_adapter", "clip", "face", "upscale")}
    for needed in ("stabilityai/sdxl-turbo", "stabilityai/sd-turbo", "black-forest-labs/FLUX.1-schnell",
                   "black-forest-labs/FLUX.1-dev", "stabilityai/stable-diffusion-xl-base-1.0", "h94/IP-Adapter",
                   "ncnn:realesrgan-x4plus", "ncnn:realesr-animevideov3-x4", "ViT-L-14", "ViT-B-32"):
        assert needed in sources, needed
    loras = {lo.source for p in profiles.PROFILES.values() for lo in p.draft_model.loras}
    assert {"latent-consistency/lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdxl"} <= loras
    for p in profiles.PROFILES.values():
        for s in (p.draft, p.refine, p.inpaint):
            assert s.scheduler in profiles.SCHEDULERS


def test_missing_weights_fail_fast_with_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "atelier.cli", "run", str(REPO / "campaigns" / "demo.yaml"),
                          "--profile", "sdxl-turbo", "--home", str(home)], capture_output=True, text=True,
                         env=_clean_env(tmp_path), cwd=REPO, timeout=60)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 2, res.stderr
    assert elapsed < 2.0 + 1.5, elapsed  # the check itself takes milliseconds; the rest is interpreter start-up
    err = " ".join(res.stderr.split())
    assert "sdxl-turbo (stabilityai/sdxl-turbo) is not available locally" in err
    assert "hf download stabilityai/sdxl-turbo" in err
    assert "Traceback" not in res.stderr
    assert not home.exists()  # nothing written


def test_models_command_lists_every_profile(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["models", "--json", "--home", str(tmp_path / "home")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["profile"] for r in rows} == set(profiles.PROFILES)
    tiny = [r for r in rows if r["profile"] == "tiny"]
    assert all(r["available"] for r in tiny)
    assert any(r["source"] == "ncnn:realesr-animevideov3-x4" and r["available"] for r in rows)


def test_loads_a_model_from_the_hugging_face_cache(models_dir: Path, tmp_path: Path) -> None:
    """A Hugging Face id resolves through the local HF cache (snapshot layout), offline."""
    snap = tmp_path / "hf" / "hub" / "models--atelier-test--tiny-sd" / "snapshots" / "0123abcd"
    shutil.copytree(models_dir / "tiny" / "sd", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    code = (
        "from pathlib import Path; from atelier import sources; from atelier.models import Models;"
        "from atelier.profiles import ModelSpec; from stages import draft;"
        "spec = ModelSpec('hf-tiny', 'diffusers', 'atelier-test/tiny-sd', family='sd');"
        f"print(sources.resolve(spec, Path({str(tmp_path / 'models')!r})));"
        "req = draft.DraftRequest(prompt='a bike', negative='', width=64, height=64, steps=2, guidance=1.0,"
        " scheduler='lcm', model=spec, seeds=(1,), indices=(0,));"
        f"d = draft.generate_drafts(req, Models.at(Path({str(tmp_path)!r})));"
        "print(d[0].image.size)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(tmp_path),
                         cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr
    assert str(snap) in res.stdout and "(64, 64)" in res.stdout


def _draft(spec, models_dir, scheduler="lcm", steps=4):
    req = draft.DraftRequest(prompt="a red bicycle", negative="", width=64, height=64, steps=steps, guidance=1.0,
                             scheduler=scheduler, model=spec, seeds=(11,), indices=(0,))
    return np.asarray(draft.generate_drafts(req, Models.at(models_dir))[0].image, int)


def test_lora_changes_output_and_weight_zero_restores_it(models_dir: Path, tiny_profile) -> None:
    base = tiny_profile.draft_model
    with_lora = replace(base, loras=(profiles.Lora("style", "tiny:lora", scale=1.0),))
    zero = replace(base, loras=(profiles.Lora("style", "tiny:lora", scale=0.0),))
    plain = _draft(base, models_dir)
    styled = _draft(with_lora, models_dir)
    assert np.abs(plain - styled).mean() > 1.0  # the random LoRA acts on the shared UNet
    assert np.array_equal(_draft(zero, models_dir), plain)  # set_adapters weight 0 == no LoRA
    assert np.array_equal(_draft(base, models_dir), plain)  # a spec without LoRAs disables them again
    ident = Models.at(models_dir).identity(with_lora)
    assert ident["loras"][0]["scale"] == 1.0 and len(ident["loras"][0]["weights_sha256"]) == 64
    assert ident != Models.at(models_dir).identity(base)  # LoRAs are part of the model identity (cache key)


@pytest.mark.parametrize("name", sorted(set(profiles.SCHEDULERS) - {"flow-euler"}))
def test_schedulers_by_name(models_dir: Path, tiny_profile, name: str) -> None:
    out = _draft(tiny_profile.draft_model, models_dir, scheduler=name, steps=3)
    pipe = Models.at(models_dir).pipeline(tiny_profile.draft_model, "txt2img", name)
    assert type(pipe.scheduler).__name__ == profiles.SCHEDULERS[name]
    if name == "dpm++-2m-karras":
        assert pipe.scheduler.config.use_karras_sigmas
    assert out.shape == (64, 64, 3)


def test_unknown_scheduler_lists_known(models_dir: Path, tiny_profile) -> None:
    with pytest.raises(ValueError, match="known: lcm, euler"):
        Models.at(models_dir).pipeline(tiny_profile.draft_model, "txt2img", "heun-fancy")
