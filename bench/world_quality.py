"""Quality of the micro models on the micro world, judged against its ground truth.

    .venv/bin/python bench/world_quality.py [--models models/micro] [--prompts 24] [--drafts 8] [--quick]

Measures, on held-out prompts (scenes from a generator no training stage uses):
- CLIP zero-shot accuracy per attribute (true caption vs the attribute set to each other value, N-way);
- draft adherence (pixel judge) for a few few-step scheduler settings, and at the chosen draft setting;
- selection lift: judge score of CLIP's top-k of N drafts minus the mean of all N, per prompt, with a
  bootstrap 95 % CI over prompts;
- refine adherence (img2img at 128 px, IP-Adapter on the mood board) of the kept drafts;
- style pull: palette distance and style / background agreement of refine outputs with a mood board,
  at IP-Adapter scale 0 vs the profile's scale, for prompts that leave palette and style unsaid;
- inpaint: the masked object's colour moves to the inpaint prompt's; outside the mask, after the
  stage's compositing, pixels are the input's;
- seconds per image per stage on this machine.
Writes bench/results/world_quality.{json,md} and a picture grid bench/results/world_quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atelier.world import evaluate as ev  # noqa: E402
from atelier.world.judge import judge  # noqa: E402
from atelier.world.render import layout, render  # noqa: E402
from atelier.world.scene import COLOURS, caption, sample_scene  # noqa: E402

# The micro profile's settings (what the model card recommends).
DRAFT = dict(steps=4, guidance=3.0, scheduler="euler", width=64, height=64)  # best <=4-step setting of the sweep
REFINE = dict(steps=12, guidance=3.0, scheduler="euler", width=128, height=128, strength=0.5)
INPAINT = dict(steps=12, guidance=3.0, scheduler="euler", strength=1.0)
IP_SCALE = 0.6
NEGATIVE = ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", type=Path, default=ROOT / "models" / "micro")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--drafts", type=int, default=8)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--clip-scenes", type=int, default=180)
    p.add_argument("--quick", action="store_true", help="a few prompts (minutes -> seconds)")
    p.add_argument("--skip-sweep", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.prompts, a.drafts, a.clip_scenes = 6, 4, 60
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atelier import compat

    compat.apply()
    import torch
    from PIL import Image

    from atelier.world.loading import embed_images, embed_texts, load_clip, pipeline, specs

    models_dir = ROOT / ".atelier" / "bench-world-models"
    sp = specs(a.models)
    res: dict = {"models": str(a.models), "settings": {"draft": DRAFT, "refine": REFINE, "inpaint": INPAINT,
                                                       "ip_adapter_scale": IP_SCALE},
                 "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                             "device": "cuda" if torch.cuda.is_available() else "cpu"}}
    timing: dict = {}
    grid_rows: list[list[Image.Image]] = []

    # 1. CLIP zero-shot
    t = time.perf_counter()
    clip = load_clip(sp["clip"], models_dir)
    res["clip_zero_shot"] = ev.clip_zero_shot(clip, ev.held_out_scenes(a.clip_scenes), size=(64, 64))
    res["clip_zero_shot_16x9"] = ev.clip_zero_shot(clip, ev.held_out_scenes(a.clip_scenes // 3, seed=99),
                                                   size=(112, 64))
    timing["clip_zero_shot_s"] = time.perf_counter() - t
    print("clip", json.dumps({k: round(v["accuracy"], 3) for k, v in res["clip_zero_shot"].items()}), flush=True)

    scenes = ev.held_out_scenes(a.prompts, seed=2024)
    prompts = [caption(s) for s in scenes]
    t2i = pipeline(sp["sd"], models_dir, "txt2img", DRAFT["scheduler"])

    # 2. few-step sweep (a subset): which scheduler / steps / guidance is good at 2-4 steps
    if not a.skip_sweep:
        sweep = {}
        sub = scenes[: max(4, a.prompts // 2)]
        sub_p = [caption(s) for s in sub]
        for sched in ("euler", "dpm++-2m-karras", "lcm", "unipc"):
            for steps in (2, 4, 8):
                for g in (3.0, 5.0, 7.0):
                    if sched == "lcm" and g != 5.0:
                        continue
                    pipe = pipeline(sp["sd"], models_dir, "txt2img", sched)
                    ims, spi = ev.generate(pipe, sub_p * 2, list(range(len(sub_p) * 2)), 64, 64, steps, g, NEGATIVE)
                    sweep[f"{sched}/{steps}/g{g:g}"] = {**ev.adherence(ims, sub * 2), "s_per_image": spi}
                    print("sweep", sched, steps, g, round(sweep[f"{sched}/{steps}/g{g:g}"]["score"], 3), flush=True)
        res["draft_sweep"] = sweep

    # 3. drafts at the profile setting, selection lift
    t2i = pipeline(sp["sd"], models_dir, "txt2img", DRAFT["scheduler"])
    all_prompts = [pp for pp in prompts for _ in range(a.drafts)]
    seeds = [1000 * i + k for i in range(len(prompts)) for k in range(a.drafts)]
    drafts, spi = ev.generate(t2i, all_prompts, seeds, DRAFT["width"], DRAFT["height"], DRAFT["steps"],
                              DRAFT["guidance"], NEGATIVE)
    timing["draft_s_per_image"] = spi
    res["draft_adherence"] = ev.adherence(drafts, [s for s in scenes for _ in range(a.drafts)])
    # random-weights reference: the judge on renders of other scenes (what "no prompt following" scores)
    rng = np.random.default_rng(7)
    res["chance_adherence"] = ev.adherence([render(sample_scene(rng), 64, 64, seed=i) for i in range(len(drafts))],
                                           [s for s in scenes for _ in range(a.drafts)])
    # the ceiling the VAE leaves: the judge on encode -> decode round trips of the prompts' own renders (what a
    # perfect UNet could score through this autoencoder at the draft size)
    res["vae_roundtrip_adherence"] = ev.adherence(_vae_roundtrip(t2i.vae, [render(s, DRAFT["width"], DRAFT["height"],
                                                                                  seed=i) for i, s in enumerate(scenes)]),
                                                  scenes)
    lifts, kept_all = [], []
    t = time.perf_counter()
    for i, s in enumerate(scenes):
        ims = drafts[i * a.drafts:(i + 1) * a.drafts]
        x = embed_images(clip, ims)
        tt = embed_texts(clip, [prompts[i]])[0]
        order = np.argsort(-(x @ tt))
        scores = np.array([judge(im, s).score for im in ims])
        lifts.append(float(scores[order[: a.keep]].mean() - scores.mean()))
        kept_all.append([ims[k] for k in order[: a.keep]])
        if i < 6:
            grid_rows.append([render(s, 64, 64, seed=0)] + [ims[k] for k in order])
    timing["select_s_per_draft"] = (time.perf_counter() - t) / max(1, len(drafts))
    res["selection_lift"] = ev.mean_ci(lifts)
    print("draft", res["draft_adherence"], "lift", res["selection_lift"], flush=True)

    # 4. refine (img2img + IP-Adapter on a mood board rendered in the prompt's own palette and style)
    i2i = pipeline(sp["sd"], models_dir, "img2img", REFINE["scheduler"], ip_adapter=sp["ip_adapter"])
    i2i.set_ip_adapter_scale(IP_SCALE)
    refined, ref_scenes = [], []
    t = time.perf_counter()
    for i, s in enumerate(scenes):
        board_rng = np.random.default_rng([i, 77])
        board = [render(_same_palette(s, board_rng), 64, 64, seed=77 + k) for k in range(2)]
        ims, _ = ev.generate(i2i, [prompts[i]] * a.keep, [5000 + i * 10 + k for k in range(a.keep)],
                             REFINE["width"], REFINE["height"], REFINE["steps"], REFINE["guidance"], NEGATIVE,
                             image=[im.resize((REFINE["width"], REFINE["height"]), Image.Resampling.LANCZOS)
                                    for im in kept_all[i]],
                             strength=REFINE["strength"], ip_adapter_image=[board])
        refined += ims
        ref_scenes += [s] * a.keep
        if i < 6:
            grid_rows[i] += [im.resize((64, 64)) for im in ims]
    timing["refine_s_per_image"] = (time.perf_counter() - t) / max(1, len(refined))
    res["refine_adherence"] = ev.adherence(refined, ref_scenes)
    res["kept_draft_adherence"] = ev.adherence([im for ks in kept_all for im in ks], ref_scenes)
    print("refine", res["refine_adherence"], flush=True)

    # 5. style pull: prompts without palette / style; mood board of one palette + style
    pull = {"scale_0": {"dist": [], "bg": [], "style": [], "colour": []},
            f"scale_{IP_SCALE:g}": {"dist": [], "bg": [], "style": [], "colour": []}}
    rng = np.random.default_rng(31)
    n_pull = max(6, a.prompts // 2)
    for i in range(n_pull):
        target = sample_scene(rng)
        board = [render(_same_palette(target, rng), 64, 64, seed=k) for k in range(3)]
        prompt = caption(target, drop=("background", "colour", "style"))
        init = render(sample_scene(rng), 128, 128, seed=i)
        for scale, key in ((0.0, "scale_0"), (IP_SCALE, f"scale_{IP_SCALE:g}")):
            i2i.set_ip_adapter_scale(scale)
            ims, _ = ev.generate(i2i, [prompt], [900 + i], 128, 128, REFINE["steps"], REFINE["guidance"], NEGATIVE,
                                 image=[init], strength=0.8, ip_adapter_image=[board])
            j = judge(ims[0], target)
            pull[key]["dist"].append(ev.palette_distance(ims[0], board))
            pull[key]["bg"].append(j.predicted["background"] == target.background)
            pull[key]["colour"].append(j.predicted["colour"] == target.colour)
            pull[key]["style"].append(j.predicted["style"] == target.style)
            if i < 4 and scale:
                grid_rows.append(board + [init.resize((64, 64)), ims[0].resize((64, 64))])
    i2i.set_ip_adapter_scale(IP_SCALE)
    res["style_pull"] = {k: {"palette_distance": ev.mean_ci(v["dist"]), "background_match": float(np.mean(v["bg"])),
                             "colour_match": float(np.mean(v["colour"])), "style_match": float(np.mean(v["style"]))}
                         for k, v in pull.items()}
    d0, d1 = np.array(pull["scale_0"]["dist"]), np.array(pull[f"scale_{IP_SCALE:g}"]["dist"])
    res["style_pull"]["distance_reduction"] = ev.mean_ci(d0 - d1)
    print("style pull", json.dumps(res["style_pull"]), flush=True)

    # 6. inpaint: mask the object's box, ask for another object colour
    inp = pipeline(sp["sd"], models_dir, "inpaint", INPAINT["scheduler"], ip_adapter=sp["ip_adapter"])
    inp.set_ip_adapter_scale(0.0)
    moved, outside, before_c, after_c = [], [], [], []
    t = time.perf_counter()
    rng = np.random.default_rng(41)
    n_inp = max(6, a.prompts // 2)
    for i in range(n_inp):
        s = replace(sample_scene(rng), size="large", style="flat")
        new_colour = str(rng.choice([c for c in COLOURS if c not in (s.colour, s.background)]))
        src = render(s, 128, 128, seed=i)
        cx, cy, r, _ = layout(s, 128, 128, seed=i)
        mask = Image.new("L", (128, 128), 0)
        mask.paste(255, (int(max(0, cx - r - 4)), int(max(0, cy - r - 4)), int(min(128, cx + r + 4)),
                         int(min(128, cy + r + 4))))
        want = replace(s, colour=new_colour)
        ims, _ = ev.generate(inp, [caption(want)], [70 + i], 128, 128, INPAINT["steps"], INPAINT["guidance"],
                             NEGATIVE, image=[src], mask_image=[mask], strength=INPAINT["strength"],
                             ip_adapter_image=[[src]])
        out = Image.composite(ims[0], src, mask)
        m = np.asarray(mask) > 127
        a_src, a_out = np.asarray(src).astype(float), np.asarray(out).astype(float)
        tgt = np.array(COLOURS[new_colour], dtype=float)
        d_before = np.linalg.norm(a_src[m] - tgt, axis=1).mean()
        d_after = np.linalg.norm(a_out[m] - tgt, axis=1).mean()
        moved.append(float(d_before - d_after))
        outside.append(float(np.abs(a_src[~m] - a_out[~m]).max()))
        before_c.append(judge(src, want).matches["colour"])
        after_c.append(judge(out, want).matches["colour"])
        if i < 4:
            grid_rows.append([src.resize((64, 64)), mask.convert("RGB").resize((64, 64)), out.resize((64, 64))])
    timing["inpaint_s_per_image"] = (time.perf_counter() - t) / n_inp
    res["inpaint"] = {"distance_to_new_colour_reduction": ev.mean_ci(moved),
                      "new_colour_judged_before": float(np.mean(before_c)),
                      "new_colour_judged_after": float(np.mean(after_c)),
                      "max_abs_change_outside_mask": float(np.max(outside))}
    print("inpaint", res["inpaint"], flush=True)
    res["timing"] = timing

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "world_quality.json").write_text(json.dumps(res, indent=2))
    (a.out / "world_quality.md").write_text(markdown(res))
    _grid(grid_rows).save(a.out / "world_quality.png")
    print(markdown(res))
    return 0


def _same_palette(target, rng):
    s = sample_scene(rng)
    return replace(s, background=target.background, colour=target.colour, style=target.style)


def _grid(rows):
    from PIL import Image

    cell = 64
    width = max(len(r) for r in rows) * cell
    g = Image.new("RGB", (width, len(rows) * cell), (128, 128, 128))
    for y, row in enumerate(rows):
        for x, im in enumerate(row):
            g.paste(im.convert("RGB").resize((cell, cell)), (x * cell, y * cell))
    return g.resize((g.width * 2, g.height * 2), 0)


def _vae_roundtrip(vae, images):
    """encode (posterior mean) -> decode with the pipeline's own VAE; PIL in, PIL out."""
    import torch
    from PIL import Image

    x = torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    with torch.no_grad():
        y = vae.decode(vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
    return [Image.fromarray(((im + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()) for im in y]


def markdown(r: dict) -> str:
    f = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    ci = lambda d: f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (n={d['n']})"  # noqa: E731
    lines = ["# Micro-world quality (`bench/world_quality.py`)", "",
             f"Models: `{Path(r['models']).name}`; device {r['machine']['device']}, {r['machine']['threads']} threads.", "",
             "## CLIP zero-shot (held-out renders, 64x64)", "", "| attribute | accuracy | chance | 16:9 accuracy |",
             "|---|---|---|---|"]
    for k, v in r["clip_zero_shot"].items():
        lines.append(f"| {k} | {f(v['accuracy'])} | {f(v['chance'])} | {f(r['clip_zero_shot_16x9'][k]['accuracy'])} |")
    lines += ["", "## Adherence (pixel judge; fraction of asked attributes present)", "",
              "| images | score | background | colour | shape | position | size | style |", "|---|---|---|---|---|---|---|---|"]
    for name, key in (("renders of other scenes (chance)", "chance_adherence"),
                      ("the prompts' renders through the VAE (ceiling)", "vae_roundtrip_adherence"),
                      ("drafts", "draft_adherence"),
                      ("kept drafts (CLIP top-k)", "kept_draft_adherence"), ("refined", "refine_adherence")):
        d = r.get(key)
        if d is None:
            continue
        lines.append(f"| {name} | {f(d['score'])} | " + " | ".join(f(d.get(a, float('nan'))) for a in
                     ("background", "colour", "shape", "position", "size", "style")) + " |")
    lines += ["", f"Selection lift (top-k judge score minus mean of all drafts): {ci(r['selection_lift'])}", ""]
    if "draft_sweep" in r:
        lines += ["## Few-step draft sweep (64x64)", "", "| scheduler/steps/guidance | score | s/image |", "|---|---|---|"]
        for k, v in sorted(r["draft_sweep"].items(), key=lambda kv: -kv[1]["score"]):
            lines.append(f"| {k} | {f(v['score'])} | {v['s_per_image']:.3f} |")
        lines.append("")
    sp = r["style_pull"]
    lines += ["## Style pull (refine, prompt without palette/style, 3-image mood board)", "",
              "| IP-Adapter scale | palette distance | background = board's | colour = board's | style = board's |",
              "|---|---|---|---|---|"]
    for k, v in sp.items():
        if k.startswith("scale_"):
            lines.append(f"| {k[6:]} | {ci(v['palette_distance'])} | {f(v['background_match'])} | "
                         f"{f(v['colour_match'])} | {f(v['style_match'])} |")
    lines += ["", f"Palette distance reduction (scale 0 minus scale on): {ci(sp['distance_reduction'])}", "",
              "## Inpaint (object box masked, new object colour asked)", "",
              f"- distance of masked pixels to the new colour, reduction: {ci(r['inpaint']['distance_to_new_colour_reduction'])}",
              f"- new colour judged present: before {f(r['inpaint']['new_colour_judged_before'])}, after "
              f"{f(r['inpaint']['new_colour_judged_after'])}",
              f"- max |change| outside the mask after compositing: {r['inpaint']['max_abs_change_outside_mask']:.1f}", "",
              "## Seconds per image (CPU)", ""]
    for k, v in r["timing"].items():
        lines.append(f"- {k}: {v:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
