"""Rounds: does a variation round improve what is kept, and what does a review-gated campaign cost?

    .venv/bin/python bench/rounds.py [--prompts 16] [--drafts 8] [--keep 2] [--variations 3] [--vary subtle]

On held-out micro-world prompts, with the shipped micro models and atelier's own stages (drafts, CLIP
selection with the demo mood board, variation rounds, refine), judged by the world's pixel rules
(independent of CLIP):
- adherence of the kept images per round: round 0 (the top ``keep`` of ``drafts`` drafts) and round 1
  (the top ``keep`` of ``variations`` img2img variations of each round-0 pick), for two pickers: CLIP (what
  atelier proposes) and an oracle person (picks by the judge: what a reviewer who sees the brief's intent
  can do); the round-1 minus round-0 difference per prompt with a bootstrap 95 % CI;
- device seconds (model calls, this machine) of a review-gated campaign (drafts → pick → variations → pick
  → refine the picks) vs refining every draft.
Writes bench/results/rounds.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--drafts", type=int, default=8)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--variations", type=int, default=3)
    p.add_argument("--vary", default="subtle", help="subtle | strong | a strength")
    p.add_argument("--weights", default="", help="selection weights prompt,moodboard,diversity (default: the "
                   "micro profile's)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atelier import compat

    compat.apply()
    from atelier.brief import VARY
    from atelier.keys import derive_seed
    from atelier.models import Models
    from atelier.profiles import get_profile
    from atelier.world import evaluate as ev
    from atelier.world.judge import judge
    from atelier.world.scene import caption
    from stages import draft, moodboard, refine, select, vary
    from stages.common import load_rgb
    from stages.protocol import Input

    strength = VARY.get(a.vary) or float(a.vary)
    prof = get_profile("micro")
    if a.weights:
        from dataclasses import replace

        prof = replace(prof, selection_weights=tuple(float(x) for x in a.weights.split(",")))
    models = Models.at(ROOT / ".atelier" / "bench-models")
    work = Path(tempfile.mkdtemp(prefix="atelier-rounds-"))
    seconds = {"draft": 0.0, "select": 0.0, "vary": 0.0, "refine": 0.0}
    counts = {"draft": 0, "vary": 0, "refine": 0}

    def timed(stage: str, fn, *args, n: int = 0):  # noqa: ANN001, ANN202
        t = time.perf_counter()
        result = fn(*args)
        seconds[stage] += time.perf_counter() - t
        if stage in counts:
            counts[stage] += n
        return result

    def files(outputs, tag: str) -> list[Input]:  # noqa: ANN001
        out = []
        for j, o in enumerate(outputs):
            path = work / f"{tag}-{j}.png"
            o.image.save(path)
            out.append(Input(f"{tag}-{j}", path))
        return out

    # the demo brand's mood board
    refs = [Input(f"ref{i}", f) for i, f in enumerate(sorted((ROOT / "campaigns" / "micro" / "moodboard").glob("*.png")))]
    board = moodboard.build_moodboard(moodboard.MoodboardRequest(max_style_refs=4, references=tuple(refs),
                                                                 clip=prof.clip), models)
    board_path = work / "board.npz"
    board_path.write_bytes(board.to_bytes())
    style_refs = tuple(refs[i] for i in board.style_refs)
    d, r = prof.draft, prof.refine
    rows = []
    for i, scene in enumerate(ev.held_out_scenes(a.prompts, seed=31_337)):
        prompt = caption(scene)

        def pick(cands: list[Input], by: str, keep: int, scene=scene, prompt=prompt) -> list[int]:  # noqa: ANN001
            if by == "oracle":
                scores = [judge(load_rgb(c.path), scene).score for c in cands]
                return list(np.argsort(scores)[::-1][:keep])
            req = select.SelectRequest(prompt=prompt, keep=keep, weights=prof.selection_weights, drafts=tuple(cands),
                                       moodboard=Input("board", board_path), clip=prof.clip)
            return list(timed("select", select.select_drafts, req, models).kept)

        def adherence(cands: list[Input], idx: list[int], scene=scene) -> float:  # noqa: ANN001
            return float(np.mean([judge(load_rgb(cands[k].path), scene).score for k in idx]))

        seeds = tuple(derive_seed(0, "bench", i, j) for j in range(a.drafts))
        req = draft.DraftRequest(prompt=prompt, negative="", width=64, height=64, steps=d.steps, guidance=d.guidance,
                                 scheduler=d.scheduler, model=prof.draft_model, seeds=seeds,
                                 indices=tuple(range(a.drafts)), batch_size=d.batch_size)
        drafts = files(timed("draft", draft.generate_drafts, req, models, n=a.drafts), f"p{i}-d")
        row = {"prompt": prompt, "all_drafts": adherence(drafts, list(range(len(drafts))))}
        for by in ("clip", "oracle"):
            idx0 = pick(drafts, by, a.keep)
            kept0 = [drafts[k] for k in idx0]
            row[f"{by}_r0"] = adherence(drafts, idx0)
            inits = tuple(k for k in kept0 for _ in range(a.variations))
            vreq = vary.VaryRequest(prompt=prompt, negative="", width=64, height=64,
                                    steps=max(d.steps, int(np.ceil(1 / strength))), guidance=d.guidance,
                                    strength=strength, scheduler=d.scheduler, round=1, model=prof.draft_model,
                                    inits=inits, seeds=tuple(derive_seed(0, "vary", i, k.key, j) for k in kept0
                                                             for j in range(a.variations)),
                                    variations=tuple(j for _ in kept0 for j in range(a.variations)),
                                    batch_size=d.batch_size)
            variants = files(timed("vary", vary.vary, vreq, models, n=len(inits)), f"p{i}-{by}-v")
            kept1_idx = pick(variants, by, a.keep)
            row[f"{by}_r1"] = adherence(variants, kept1_idx)
            if by == "clip":  # refine the round-1 picks: what the gated campaign finishes
                kept1 = tuple(variants[k] for k in kept1_idx)
                rreq = refine.RefineRequest(prompt=prompt, negative="", width=128, height=128, steps=r.steps,
                                            guidance=r.guidance, strength=r.strength, scheduler=r.scheduler,
                                            ip_adapter_scale=prof.ip_adapter_scale, model=prof.refine_model,
                                            ip_adapter=prof.ip_adapter, style_refs=style_refs, inits=kept1,
                                            seeds=tuple(range(len(kept1))), batch_size=r.batch_size)
                timed("refine", refine.refine, rreq, models, n=len(kept1))
        rows.append(row)
        print(f"{i + 1}/{a.prompts}", {k: round(v, 3) for k, v in row.items() if k != "prompt"}, flush=True)

    res: dict = {"settings": vars(a) | {"out": str(a.out), "strength": strength}, "per_prompt": rows}
    for by in ("clip", "oracle"):
        res[by] = {"round0": ev.mean_ci([x[f"{by}_r0"] for x in rows]),
                   "round1": ev.mean_ci([x[f"{by}_r1"] for x in rows]),
                   "round1_minus_round0": ev.mean_ci([x[f"{by}_r1"] - x[f"{by}_r0"] for x in rows]),
                   "better": sum(x[f"{by}_r1"] > x[f"{by}_r0"] for x in rows),
                   "worse": sum(x[f"{by}_r1"] < x[f"{by}_r0"] for x in rows)}
    res["all_drafts"] = ev.mean_ci([x["all_drafts"] for x in rows])
    per = {k: seconds[k] / counts[k] for k in counts if counts[k]}
    select_per = seconds["select"] / (2 * a.prompts)  # CLIP picks twice per prompt (rounds 0 and 1)
    gated = a.drafts * per["draft"] + 2 * select_per + a.keep * a.variations * per["vary"] + a.keep * per["refine"]
    every = a.drafts * per["draft"] + a.drafts * per["refine"]
    res["device_seconds_per_deliverable"] = {"per_image": per, "select_per_call": select_per,
                                             "review_gated": gated, "refine_every_draft": every,
                                             "ratio": gated / every}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "rounds.json").write_text(json.dumps(res, indent=2))

    def fmt(m: dict) -> str:
        return f"{m['mean']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]"

    ds = res["device_seconds_per_deliverable"]
    md = [f"# Rounds on the micro world ({a.prompts} held-out prompts, {a.drafts} drafts, keep {a.keep}, "
          f"{a.variations} variations per pick, vary {a.vary} = strength {strength})", "",
          "| picker | kept, round 0 | kept, round 1 | round 1 − round 0 (95 % CI) | prompts better / worse |",
          "|---|---|---|---|---|"]
    for by, label in (("clip", "CLIP (atelier's proposal)"), ("oracle", "oracle person (pixel judge)")):
        m = res[by]
        md.append(f"| {label} | {m['round0']['mean']:.3f} | {m['round1']['mean']:.3f} | {fmt(m['round1_minus_round0'])} "
                  f"| {m['better']} / {m['worse']} |")
    md += ["", f"Mean adherence of all drafts: {res['all_drafts']['mean']:.3f}.", "",
           "Device seconds per deliverable (model calls on this machine): "
           f"review-gated (drafts, pick, {a.keep}×{a.variations} variations, pick, refine {a.keep}) "
           f"**{ds['review_gated']:.2f} s** vs refining every draft **{ds['refine_every_draft']:.2f} s** "
           f"(×{ds['ratio']:.2f}); per image: " + ", ".join(f"{k} {v:.3f} s" for k, v in per.items()) + "."]
    (a.out / "rounds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
