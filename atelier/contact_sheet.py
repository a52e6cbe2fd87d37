"""The contact sheet of a run: one self-contained HTML page a reviewer opens from a file or an e-mail.

Per deliverable: the mood board, then each round (round 0: the draft grid; round n: the variations of what
the round before kept) with CLIP scores, CLIP's selection (``✓``) and a person's picks at a review gate
(``◆``, who and why) marked apart, and ratings (stars, rejected) on any image that has them; then the finals
(or what awaits review). Clicking a final opens its lineage (``<details>``: no script). Images are embedded as small
JPEG thumbnails (``data:`` URIs), styles inline: the page loads nothing from anywhere.

Built from the lineage store and the asset files only (``atelier.report.run_report`` + ancestry walks).
A Markdown twin (``markdown_sheet``) is what the Prefect artifact shows.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from atelier.report import (
    annotate_changes,
    annotate_rounds,
    candidate_names,
    lineage_dict,
    rating_dict,
    run_report,
    tree_keys,
)

THUMB = 192  # px, long side of an embedded thumbnail
FINAL_THUMB = 384
MARKDOWN_THUMB, MARKDOWN_FINAL_THUMB = 96, 256  # the Prefect artifact's sizes

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 4px;border-bottom:1px solid #ccc}
h3{font-size:14px;margin:14px 0 6px;color:#555} .meta,.prompt{color:#666;margin:0}
.grid{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;background:#fff;border:2px solid #ddd;padding:4px}
figure img,summary img{display:block;max-width:192px;max-height:192px}
figure.draft img{width:160px;height:auto;max-width:none;image-rendering:pixelated}
figure.kept{border-color:#2a8a3a} figcaption{font-size:12px;color:#444;max-width:192px}
.kept-mark{color:#2a8a3a;font-weight:bold} .note{color:#a60}
figure.vary img{width:160px;height:auto;max-width:none;image-rendering:pixelated}
figure.picked{border-color:#8a2a9a;box-shadow:0 0 0 2px #8a2a9a} .pick-mark{color:#8a2a9a;font-weight:bold}
.pick-note{color:#8a2a9a;font-style:italic} figure.rejected{opacity:.55} .rejected-mark{color:#b22}
.rating{color:#c90;letter-spacing:1px} section.round{margin:0 0 8px;padding-left:10px;border-left:3px solid #eee}
.selection{margin:6px 0 0;color:#444;font-size:13px} .awaiting{background:#fff7e0;border:1px solid #e0b040;
padding:8px 12px;display:inline-block} .legend{color:#666;font-size:12px}
details.final{display:inline-block;vertical-align:top;margin:0 10px 10px 0;background:#fff;border:2px solid #36c;
padding:4px} details.final summary{cursor:pointer;list-style:none} details.final summary img{max-width:384px;
max-height:384px} .lineage{font:12px/1.35 ui-monospace,monospace;max-width:560px} .lineage ul{margin:0;
padding-left:16px} .changed{color:#555}
"""


def thumbnail(path: Path, size: int = THUMB) -> str:
    """A ``data:`` URI of a JPEG thumbnail of ``path`` (long side at most ``size``).

    A file that cannot be read (deleted, on a store this machine cannot reach) gives a grey
    placeholder: a missing thumbnail must not fail a run or hide the rest of the sheet.
    """
    return _data_uri(_thumbnail_jpeg(path, size))


def _thumbnail_jpeg(path: Path, size: int) -> bytes:
    try:
        with Image.open(path) as im:
            return _jpeg_of(im, size)
    except OSError:
        return _jpeg_of(Image.new("RGB", (size // 4, size // 4), (200, 200, 200)), size)


def _jpeg_of(image: Image.Image, size: int) -> bytes:
    im = image.convert("RGB")  # a copy: the caller's image is not resized
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=82)
    return buf.getvalue()


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def thumbs_dir(home: Path) -> Path:
    """Where a home caches its thumbnails (``Thumbnails``)."""
    return Path(home) / "cache" / "thumbs"


class Thumbnails:
    """Thumbnails of stored assets, cached by content.

    An asset's stored path names its bytes (``assets/ab/<sha256>.png``), so a thumbnail made once is valid
    forever: it is kept in ``cache_dir`` as ``<sha256>-<size>.jpg`` and a re-run's sheet decodes no 4K PNG
    (nor fetches a remote asset) again. Paths that are not content-addressed are not cached on disk.
    """

    def __init__(self, path_of: Callable[[str], Path], cache_dir: Path | None = None) -> None:
        self.path_of, self.cache_dir = path_of, cache_dir
        self._memo: dict[tuple[str, int], str] = {}

    def __call__(self, rel_path: str, size: int = THUMB) -> str:
        if (rel_path, size) not in self._memo:
            self._memo[rel_path, size] = _data_uri(self._jpeg(rel_path, size))
        return self._memo[rel_path, size]

    def _jpeg(self, rel_path: str, size: int) -> bytes:
        sha = Path(rel_path).stem
        if self.cache_dir is None or not _is_sha256(sha):
            return _thumbnail_jpeg(self.path_of(rel_path), size)
        cached = _cached(self.cache_dir, sha, size)
        if cached.is_file():
            return cached.read_bytes()
        local = Path(self.path_of(rel_path))
        jpeg = _thumbnail_jpeg(local, size)
        if local.is_file():  # never cache the placeholder of a file that could not be read
            _write_atomic(cached, jpeg)  # concurrent runs write the same bytes
        return jpeg


def cache_thumbnails(cache_dir: Path, sha256: str, image: Image.Image,
                     sizes: tuple[int, ...] = (FINAL_THUMB, MARKDOWN_FINAL_THUMB)) -> None:
    """Put the thumbnails of an asset into the cache from its image in memory (the asset with bytes ``sha256``).

    The task that makes a 4K final calls this: the contact sheet then never decodes the 4K PNG again
    (~0.3 s each on a CPU core). Same bytes as ``Thumbnails`` would make: PNG is lossless.
    """
    if not _is_sha256(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    for size in sizes:
        _write_atomic(_cached(cache_dir, sha256, size), _jpeg_of(image, size))


def _cached(cache_dir: Path, sha256: str, size: int) -> Path:
    return cache_dir / f"{sha256}-{size}.jpg"


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` through a temp file: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def sheet_data(session: Any, run: Any, only: str | None = None) -> dict:
    """``run_report`` plus, per final, its lineage tree with what changed at each step (for the finals of
    deliverable ``only`` alone, when given)."""
    from store import queries

    data = run_report(session, run)
    for name, d in data["deliverables"].items():
        if only is not None and name != only:
            continue
        for f in d["finals"]:
            tree = annotate_changes(lineage_dict(queries.ancestry(session, f["key"])))
            ratings = {k: rating_dict(r) for k, r in queries.latest_ratings(session, tree_keys(tree)).items()}
            f["lineage"] = annotate_rounds(tree, ratings)
    return data


def render_html(data: dict, path_of: Callable[[str], Path], thumbs_dir: Path | None = None) -> str:
    """The page for ``sheet_data(...)``; ``path_of`` maps a stored asset path to a local file (``store.files.path``);
    thumbnails are cached in ``thumbs_dir`` when given (see ``Thumbnails``)."""
    e = html.escape
    thumb = Thumbnails(path_of, thumbs_dir)
    r = data["run"]
    status = f" · <span class='status'>{e(r['status'])}</span>" if r.get("status") not in (None, "completed") else ""
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>atelier · {e(r['campaign'])} · "
             f"run {e(r['id'])}</title><style>{CSS}</style></head><body>",
             f"<h1>{e(r['campaign'])} — run {e(r['id'])}</h1>",
             f"<p class='meta'>profile {e(r['profile'])} · started {e(r['started_at'].replace('T', ' '))} UTC{status}</p>"]
    if r.get("random_weights"):
        parts.append("<p class='note'>random-weight test models: the images are noise, the pipeline is real</p>")
    elif r.get("models_note"):
        parts.append(f"<p class='note'>{e(r['models_note'])}</p>")
    if any(x.get("picked") or x.get("rating") for d in data["deliverables"].values() for rd in d.get("rounds", [])
           for x in rd["candidates"]):
        parts.append("<p class='legend'><span class='kept-mark'>✓ CLIP</span>: CLIP's selection · "
                     "<span class='pick-mark'>◆ picked</span>: a person's decision at a review gate · "
                     "<span class='rating'>★</span> / <span class='rejected-mark'>✗</span>: the latest rating</p>")
    for name, d in data["deliverables"].items():
        rounds = d.get("rounds") or []
        prompt = next((x["prompt"] for x in d.get("draft", []) if x.get("prompt")), None)
        parts.append(f"<section class='deliverable' id='d-{e(name)}'><h2>{e(name)}</h2>")
        if prompt:
            parts.append(f"<p class='prompt'>{e(prompt)}</p>")
        parts.append(f"<h3>Mood board ({len(d['moodboard'])} references)</h3><div class='grid moodboard'>")
        for ref in d["moodboard"]:
            src = thumb(ref["path"])
            parts.append(f"<figure class='ref'><img alt='{e(str(ref['source']))}' src='{src}'><figcaption>"
                         f"{e(str(ref['source']))}</figcaption></figure>")
        parts.append("</div>")
        multi = len(rounds) > 1 or any(rd["gate"] for rd in rounds)
        names = candidate_names(d)
        for rd in rounds:
            parts.append(_round_html(name, rd, multi, names, thumb))
        if d.get("awaiting"):
            a = d["awaiting"]
            how = ("decided; resume the run to go on" if a["status"] == "decided"
                   else f"CLIP suggests {','.join(map(str, a['suggestion']))}")
            parts.append(f"<p class='awaiting' data-round='{a['round']}'><b>Awaiting review</b> · round {a['round']} · "
                         f"{a['candidates']} candidates · {e(how)} — <code>atelier review {e(r['id'])}</code></p>"
                         "</section>")
            continue
        parts.append(f"<h3>Finals ({len(d['finals'])}) — click one for its lineage</h3><div class='finals'>")
        for f in d["finals"]:
            label = f"{Path(f['final']).name} · {f['width']}x{f['height']}"
            marks = _rating_html(f.get("rating")) + _safety_html(f.get("safety"))
            parts.append(f"<details class='final' data-key='{e(f['key'])}'><summary>"
                         f"<img alt='{e(label)}' src='{thumb(f['path'], FINAL_THUMB)}'>"
                         f"{e(label)}{'<br>' + marks if marks else ''}</summary>"
                         f"<div class='lineage'><ul>{_lineage_html(f['lineage'])}</ul></div></details>")
        parts.append("</div>")
        for b in d.get("blocked", []):
            sf = b["safety"]
            parts.append(f"<p class='blocked' data-key='{e(b['key'])}'><b>Blocked by the safety gate</b> · final "
                         f"<code>{e(b['key'])}</code> not exported: open_nsfw {sf['nsfw']:.4f} &ge; threshold "
                         f"{sf['threshold']} (safety: {e(sf['mode'])})</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _round_html(deliverable: str, rd: dict, multi: bool, names: dict[str, str], thumb: Thumbnails) -> str:
    """One round of a deliverable: its candidates with the marks, then what was kept and by whom."""
    e = html.escape
    n, cands = rd["round"], rd["candidates"]
    kept = sum(1 for x in cands if x.get("kept"))
    kept_text = f"{kept} kept" if not rd.get("gate") else f"CLIP suggested {kept}" + (
        f", {rd['picks'][0]['by']} kept {len(rd['picks'])}" if rd["picks"] else "")
    if n == 0:
        title = f"{'Round 0 · d' if multi else 'D'}rafts ({len(cands)}, {kept_text})"
    else:
        strength = f", strength {rd['strength']:g}" if rd.get("strength") is not None else ""
        title = f"Round {n} · variations ({len(cands)}{strength}, {kept_text})"
    kind = "draft" if n == 0 else "vary"
    parts = [f"<section class='round' id='d-{e(deliverable)}-r{n}' data-round='{n}'><h3>{e(title)}</h3>"
             f"<div class='grid {'drafts' if n == 0 else 'variations'}'>"]
    for x in cands:
        score = (f"<br>prompt {x['prompt_score']:+.3f} · mood {x['moodboard_score']:+.3f}"
                 f"<br>total {x['total']:+.3f}" if "total" in x else "")
        rank = f" · CLIP rank {x['clip_rank']}/{len(cands)}" if multi and x.get("clip_rank") else ""
        head = (f"#{x.get('index')} seed {x['seed']}" if n == 0
                else f"r{n}.{x['number']} ← {e(names.get(x.get('from'), (x.get('from') or '')[:10]))} · seed {x['seed']}")
        marks = ""
        if x.get("kept"):
            marks += f"<br><span class='kept-mark'>✓ {'CLIP' if multi else 'kept'} #{x['rank']}</span>"
        if x.get("picked"):
            marks += (f"<br><span class='pick-mark' data-by='{e(str(x.get('picked_by')))}'>◆ picked #{x['picked']} "
                      f"by {e(str(x.get('picked_by')))}</span>")
        rating = _rating_html(x.get("rating"))
        marks += f"<br>{rating}" if rating else ""
        marks += _safety_html(x.get("safety"))
        classes = " ".join(c for c in (kind, "kept" if x.get("kept") else "", "picked" if x.get("picked") else "",
                                       "rejected" if (x.get("rating") or {}).get("rejected") else "") if c)
        parts.append(f"<figure class='{classes}' data-key='{e(x['key'])}' data-number='{x['number']}'>"
                     f"<img alt='{kind} seed {x['seed']}' src='{thumb(x['path'])}'>"
                     f"<figcaption>{head}{rank}{score}{marks}</figcaption></figure>")
    parts.append("</div>")
    review = rd.get("review")
    lines = []
    if multi:
        clip = ", ".join(names.get(k, k[:10]) for k in rd["clip_kept"])
        lines.append(f"<span class='clip'>CLIP {'suggested' if rd['gate'] else 'kept'}: {e(clip) or '—'}</span>")
    if review and (rd["picks"] or (rd["gate"] or {}).get("status") == "decided"):
        kept_by = ", ".join(names.get(k, k[:10]) for k in review["kept"])
        rejected = (f" · rejected {e(', '.join(names.get(k, k[:10]) for k in review['rejected']))}"
                    if review["rejected"] else "")
        note = f": <span class='pick-note'>{e(review['note'])}</span>" if review["note"] else ""
        lines.append(f"<span class='review' data-by='{e(review['by'])}'><span class='pick-mark'>◆ {e(review['by'])} kept "
                     f"{e(kept_by)}</span>{rejected}{note} <span class='meta'>({e(review['at'].replace('T', ' '))} UTC)"
                     "</span></span>")
    elif (rd["gate"] or {}).get("status") == "awaiting":
        lines.append("<span class='awaiting-mark'>awaiting a person's decision</span>")
    if lines:
        parts.append(f"<p class='selection'>{' · '.join(lines)}</p>")
    parts.append("</section>")
    return "".join(parts)


def _safety_html(verdict: dict | None) -> str:
    """The safety gate's score of an image, and its decision when it was not a pass."""
    if not verdict:
        return ""
    decision = verdict["decision"]
    mark = "" if decision == "pass" else (f" · <span class='safety-mark' data-decision='{html.escape(decision)}'>"
                                          f"⚠ {html.escape(decision)}</span>")
    return f"<br><span class='safety'>nsfw {verdict['nsfw']:.3f}</span>{mark}"


def _rating_html(rating: dict | None) -> str:
    if not rating:
        return ""
    e = html.escape
    out = []
    if rating.get("stars"):
        out.append(f"<span class='rating' data-stars='{rating['stars']}' title='{e(rating.get('by') or '')}'>"
                   f"{'★' * rating['stars']}{'☆' * (5 - rating['stars'])}</span>")
    if rating.get("rejected"):
        out.append(f"<span class='rejected-mark' title='{e(rating.get('by') or '')}'>✗ rejected</span>")
    if rating.get("note"):
        out.append(f"<span class='note'>{e(rating['note'])}</span>")
    return " ".join(out)


def _lineage_html(node: dict) -> str:
    e = html.escape
    role = f" ({e(node['role'])})" if node["role"] else ""
    changed = ", ".join(f"{e(k)}={e(_short(v[1]))}" for k, v in node.get("changed", {}).items())
    kids = "".join(_lineage_html(p) for p in node["parents"])
    pick = f" <span class='pick-mark'>◆ {e(node['pick']['text'])}</span>" if "pick" in node else ""
    variation = f" <span class='variation'>{e(node['variation']['text'])}</span>" if "variation" in node else ""
    rating = _rating_html(node.get("rating"))
    return (f"<li><b>{e(node['stage'])}</b> {e(node['key'][:12])}{role}{pick}{variation}"
            + (f" {rating}" if rating else "")
            + (f" <span class='changed'>{changed}</span>" if changed else "")
            + (f"<ul>{kids}</ul>" if kids else "") + "</li>")


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown_sheet(data: dict, path_of: Callable[[str], Path], deliverable: str, thumbs_dir: Path | None = None) -> str:
    """One deliverable's part of the sheet as Markdown (Prefect artifacts render Markdown, not HTML)."""
    thumb = Thumbnails(path_of, thumbs_dir)
    d = data["deliverables"][deliverable]
    r = data["run"]
    lines = [f"# {r['campaign']} / {deliverable} — run {r['id']}", "", "## Mood board", ""]
    lines += [f"![{ref['source']}]({thumb(ref['path'], MARKDOWN_THUMB)})" for ref in d["moodboard"]]
    rounds = d.get("rounds") or [{"round": 0, "candidates": d.get("draft", []), "picks": [], "review": None,
                                  "gate": None, "strength": None}]
    names = candidate_names(d)
    for rd in rounds:
        n = rd["round"]
        if n == 0:
            lines += ["", "## Drafts", "", "| draft | seed | prompt | mood board | total | kept | picked | rating |",
                      "|---|---|---|---|---|---|---|---|"]
        else:
            strength = f", strength {rd['strength']:g}" if rd.get("strength") is not None else ""
            lines += ["", f"## Round {n} · variations{strength}", "",
                      "| variation | # | of | seed | prompt | mood board | total | CLIP | picked | rating |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        for x in rd["candidates"]:
            scores = [f"{x[k]:+.3f}" if k in x else "" for k in ("prompt_score", "moodboard_score", "total")]
            picked = f"◆ #{x['picked']} {x.get('picked_by')}" if x.get("picked") else ""
            rating = _rating_text(x.get("rating"))
            of = "" if n == 0 else f" {names[x['key']]} | {names.get(x.get('from'), (x.get('from') or '')[:10])} |"
            alt = "draft" if n == 0 else "variation"
            lines.append(f"| ![{alt}]({thumb(x['path'], MARKDOWN_THUMB)}) |{of} {x['seed']} | {' | '.join(scores)} | "
                         f"{'✓ #' + str(x['rank']) if x.get('kept') else ''} | {picked} | {rating} |")
        review = rd.get("review")
        if review and (rd["picks"] or (rd["gate"] or {}).get("status") == "decided"):
            kept = ", ".join(names.get(k, k[:10]) for k in review["kept"])
            lines += ["", f"◆ **{review['by']}** kept {kept}" + (f": _{review['note']}_" if review["note"] else "")]
        elif (rd["gate"] or {}).get("status") == "awaiting":
            lines += ["", "**awaiting a person's decision**"]
    if d.get("awaiting"):
        a = d["awaiting"]
        lines += ["", "## Awaiting review", "", f"Round {a['round']}, {a['candidates']} candidates: "
                  f"`atelier review {r['id']} --deliverable {deliverable}`", ""]
        return "\n".join(lines)
    lines += ["", "## Finals", ""]
    for b in d.get("blocked", []):
        lines += [f"**Blocked by the safety gate**: final `{b['key']}` not exported (open_nsfw "
                  f"{b['safety']['nsfw']:.4f} >= threshold {b['safety']['threshold']}, safety: {b['safety']['mode']})", ""]
    for f in d["finals"]:
        rating = _rating_text(f.get("rating"))
        lines += [f"### {Path(f['final']).name} ({f['width']}x{f['height']})" + (f" {rating}" if rating else ""), "",
                  f"![final]({thumb(f['path'], MARKDOWN_FINAL_THUMB)})", ""]
        node = f["lineage"]
        while node is not None:
            skip = {"round", "strength"} if "variation" in node else set()  # in its text
            changed = ", ".join(f"{k}={_short(v[1], 40)}" for k, v in node.get("changed", {}).items() if k not in skip)
            extra = node["pick"]["text"] if "pick" in node else node["variation"]["text"] if "variation" in node else ""
            lines.append(f"- **{node['stage']}** `{node['key'][:12]}` " + " · ".join(x for x in (extra, changed) if x))
            node = next((p for p in node["parents"] if p["role"] in ("source", "init")), None)
        lines.append("")
    return "\n".join(lines)


def _rating_text(rating: dict | None) -> str:
    if not rating:
        return ""
    return " ".join(x for x in ("★" * rating["stars"] if rating.get("stars") else "",
                                "✗ rejected" if rating.get("rejected") else "") if x)


def write_page(page: str, target: Path) -> Path:
    """Write ``page`` to ``target`` atomically (a reader never sees half a page)."""
    _write_atomic(target, page.encode("utf-8"))
    return target
