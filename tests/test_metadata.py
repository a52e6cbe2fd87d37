"""The recipe travels with the file: A1111 infotext, the lineage document in PNG / JPEG / WebP and
sidecars, and `atelier lineage` on a copy with no database (one small real run on tiny models)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import ExifTags, Image
from typer.testing import CliRunner

from atelier import metadata
from atelier.cli import app
from stages.common import png_bytes

SHA = "0123456789abcdef" * 4


def _chain() -> dict:
    """A hand-made document: reference + draft -> select -> refine -> face restore -> upscale."""
    r = metadata.record
    draft = r("draft", "image", "c", "hero", 112, 64,
              {"prompt": "a red bicycle, brick wall: sunlit", "negative": "people, watermark", "seed": 1234567,
               "steps": 4, "guidance": 1.0, "scheduler": "lcm", "width": 112, "height": 64, "index": 0},
              {"name": "tiny-sd", "kind": "diffusers", "weights_sha256": SHA}, [])
    ancestors = {
        "ref": r("reference", "image", "c", None, 640, 480, {"source": "refs/coffee.jpg", "sha256": "ff" * 32},
                 None, []),
        "draft": draft,
        "select": r("select", "image", "c", "hero", 112, 64, {"rank": 1, "total": 0.25}, None, [("draft", "source")]),
        "refine": r("refine", "image", "c", "hero", 192, 112,
                    {**{k: draft["params"][k] for k in ("prompt", "negative", "seed")}, "steps": 8, "guidance": 5.0,
                     "strength": 0.6, "scheduler": "dpm++-2m-karras", "ip_adapter_scale": 0.6},
                    {"pipeline": {"name": "tiny-sd", "weights_sha256": SHA},
                     "ip_adapter": {"name": "tiny-ip-adapter", "weights_sha256": SHA}},
                    [("select", "init"), ("ref", "style-ref")]),
        "face": r("face_restore", "image", "c", "hero", 192, 112, {"faces": [[1, 2, 3, 4]]},
                  {"name": "tiny-gfpgan", "kind": "gfpgan", "weights_sha256": SHA}, [("refine", "source")]),
    }
    up = r("upscale", "image", "c", "hero", 320, 180, {"width": 320, "height": 180, "tile": 128},
           {"name": "tiny-realesrgan", "kind": "realesrgan", "weights_sha256": SHA}, [("face", "source")])
    return metadata.lineage_doc("final", up, ancestors)


# ------------------------------------------------------------------------------------ A1111 infotext
def test_a1111_infotext_of_a_post_edit_carries_its_generation_and_steps() -> None:
    text = metadata.a1111_parameters(_chain())
    prompt, negative, line = text.split("\n")
    assert prompt == "a red bicycle, brick wall: sunlit" and negative == "Negative prompt: people, watermark"
    assert line == ("Steps: 8, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1234567, "
                    "Face restoration: GFPGAN, Size: 192x112, Model hash: 0123456789, Model: tiny-sd, "
                    "Denoising strength: 0.6, IP-Adapter: tiny-ip-adapter, IP-Adapter scale: 0.6, "
                    "Postprocess upscale to: 320x180, Postprocess upscaler: tiny-realesrgan")
    parsed = metadata.parse_a1111(text)
    assert parsed["Prompt"] == "a red bicycle, brick wall: sunlit"
    assert parsed["Negative prompt"] == "people, watermark"
    assert (parsed["Steps"], parsed["Seed"], parsed["CFG scale"]) == ("8", "1234567", "5")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Model hash"]) == ("192", "112", SHA[:10])
    assert parsed["Denoising strength"] == "0.6" and parsed["Face restoration"] == "GFPGAN"


def test_a1111_infotext_after_an_inpaint_is_the_inpaint() -> None:
    doc = _chain()
    a = doc["ancestors"]
    a["mask"] = metadata.record("mask", "mask", "c", "hero", 192, 112, {"region": [0, 0, 0.5, 0.5]}, None, [])
    a["inpaint"] = metadata.record(
        "inpaint", "image", "c", "hero", 192, 112,
        {"prompt": "plain wall", "negative": "watermark", "seed": 1234567, "steps": 6, "guidance": 5.0,
         "strength": 1.0, "scheduler": "euler", "ip_adapter_scale": 0.6}, a["refine"]["model"],
        [("refine", "source"), ("mask", "mask"), ("ref", "style-ref")])
    a["face"]["parents"] = [["inpaint", "source"]]
    parsed = metadata.parse_a1111(metadata.a1111_parameters(doc))
    assert (parsed["Prompt"], parsed["Negative prompt"], parsed["Sampler"]) == ("plain wall", "watermark", "Euler")
    assert (parsed["Steps"], parsed["Denoising strength"], parsed["Seed"]) == ("6", "1", "1234567")
    assert parsed["Face restoration"] == "GFPGAN" and parsed["Postprocess upscaler"] == "tiny-realesrgan"


def test_a1111_infotext_of_a_draft_and_of_assets_without_a_generation() -> None:
    doc = _chain()
    draft = metadata.lineage_doc("draft", doc["ancestors"]["draft"], {})
    parsed = metadata.parse_a1111(metadata.a1111_parameters(draft))
    assert parsed["Sampler"] == "LCM" and "Schedule type" not in parsed and "Denoising strength" not in parsed
    assert (parsed["Seed"], parsed["Size-1"], parsed["Size-2"], parsed["Model"]) == ("1234567", "112", "64", "tiny-sd")
    assert "Lora hashes" not in parsed
    with_lora = {**doc["ancestors"]["draft"], "model": {"name": "sd15-lcm", "weights_sha256": SHA,
                                                        "loras": [{"name": "lcm", "weights_sha256": SHA[::-1]}]}}
    parsed = metadata.parse_a1111(metadata.a1111_parameters(metadata.lineage_doc("d", with_lora, {})))
    assert parsed["Lora hashes"] == f"lcm: {SHA[::-1][:12]}"  # A1111's form, quoted in the text
    # A selected draft is the draft's generation; a reference or a mask has none.
    select = metadata.lineage_doc("select", doc["ancestors"]["select"], {"draft": doc["ancestors"]["draft"]})
    assert metadata.a1111_parameters(select) == metadata.a1111_parameters(draft)
    assert metadata.a1111_parameters(metadata.lineage_doc("ref", doc["ancestors"]["ref"], {})) is None
    face_mask = metadata.record("mask", "mask", "c", "hero", 192, 112, {"faces": []}, None, [("refine", "source")])
    assert metadata.a1111_parameters(metadata.lineage_doc("m", face_mask, doc["ancestors"])) is None  # derived data
    assert "parameters" not in metadata.png_text(metadata.lineage_doc("ref", doc["ancestors"]["ref"], {}))


@pytest.mark.parametrize("scheduler, sampler", [("lcm", "LCM"), ("euler", "Euler"), ("euler-a", "Euler a"),
                                                ("ddim", "DDIM"), ("unipc", "UniPC"), ("dpm++-2m-karras", "DPM++ 2M"),
                                                ("flow-euler", "Euler")])
def test_every_registry_scheduler_has_an_a1111_sampler_name(scheduler, sampler) -> None:
    from atelier.profiles import SCHEDULERS

    assert set(metadata.A1111_SAMPLERS) == set(SCHEDULERS)
    doc = _chain()
    draft = doc["ancestors"]["draft"]
    draft = {**draft, "params": {**draft["params"], "scheduler": scheduler}}
    assert metadata.parse_a1111(metadata.a1111_parameters(metadata.lineage_doc("d", draft, {})))["Sampler"] == sampler


def test_parse_a1111_reads_an_a1111_infotext_and_quoted_values() -> None:
    # The example of A1111's own parse_generation_parameters docstring, then a quoted value.
    text = ("girl with an artist's beret, determined, blue eyes, desert scene\n"
            "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry]\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b")
    parsed = metadata.parse_a1111(text)
    assert parsed == {"Prompt": "girl with an artist's beret, determined, blue eyes, desert scene",
                      "Negative prompt": "ugly, fat, obese, chubby, (((deformed))), [blurry]", "Steps": "20",
                      "Sampler": "Euler a", "CFG scale": "7", "Seed": "965400086", "Size-1": "512", "Size-2": "512",
                      "Model hash": "45dee52b"}
    doc = _chain()
    draft = doc["ancestors"]["draft"]
    draft = {**draft, "params": {**draft["params"], "prompt": "line one\nline two", "negative": ""},
             "model": {"name": "brand, v2: final", "weights_sha256": SHA}}
    text = metadata.a1111_parameters(metadata.lineage_doc("d", draft, {}))
    assert 'Model: "brand, v2: final"' in text and "Negative prompt" not in text
    parsed = metadata.parse_a1111(text)
    assert parsed["Prompt"] == "line one\nline two" and parsed["Model"] == "brand, v2: final"


# --------------------------------------------------------------------------- PNG / JPEG / WebP / sidecar
def test_metadata_round_trips_through_png_jpeg_and_webp(tmp_path) -> None:
    doc = _chain()
    image = Image.linear_gradient("L").convert("RGB").resize((96, 64))
    data = png_bytes(image, metadata.png_text(doc))
    assert data == png_bytes(image, metadata.png_text(json.loads(json.dumps(doc))))  # same recipe, same bytes
    png = tmp_path / "hero-1.png"
    png.write_bytes(data)
    with Image.open(png) as im:
        assert im.info["parameters"] == metadata.a1111_parameters(doc)
    assert metadata.read_embedded(png) == metadata.Embedded(doc, "PNG text chunk")
    for suffix, fmt in ((".jpg", "JPEG"), (".webp", "WEBP")):
        out = metadata.write_delivery(png, tmp_path / f"hero-1{suffix}")
        with Image.open(out) as im:
            assert im.format == fmt and im.size == (96, 64)
            # where A1111 reads it for JPEG / WebP: EXIF UserComment, "UNICODE" + UTF-16BE
            comment = im.getexif().get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment]
        assert comment[:8] == b"UNICODE\0" and comment[8:].decode("utf-16-be") == metadata.a1111_parameters(doc)
        assert json.loads(metadata.sidecar_path(out).read_text()) == doc
        metadata.sidecar_path(out).unlink()  # the file alone carries it
        assert metadata.read_embedded(out) == metadata.Embedded(doc, "XMP")


def test_a_file_stripped_of_metadata_is_read_from_its_sidecar(tmp_path) -> None:
    doc = _chain()
    plain = tmp_path / "hero-1.jpg"
    Image.new("RGB", (32, 32), "red").save(plain)
    assert metadata.read_embedded(plain) is None
    metadata.write_sidecar(plain, doc)
    assert metadata.read_embedded(plain) == metadata.Embedded(doc, "sidecar hero-1.jpg.json")
    side = metadata.sidecar_path(plain)
    assert metadata.read_embedded(side) == metadata.Embedded(doc, "sidecar hero-1.jpg.json")  # given directly


def test_a_chain_too_long_for_jpeg_xmp_is_truncated_and_completed_by_the_sidecar(tmp_path) -> None:
    doc = _chain()
    doc["ancestors"]["ref"]["params"]["notes"] = "x" * 70_000  # > one JPEG APP1 segment
    png = tmp_path / "big.png"
    png.write_bytes(png_bytes(Image.new("RGB", (16, 16)), metadata.png_text(doc)))
    jpg = metadata.write_delivery(png, tmp_path / "big.jpg")
    assert metadata.read_embedded(jpg).doc == doc  # from the sidecar
    metadata.sidecar_path(jpg).unlink()
    alone = metadata.read_embedded(jpg)
    assert alone.carrier == "XMP" and alone.doc["truncated"] is True and "ancestors" not in alone.doc
    tree = metadata.lineage_tree(alone.doc)
    assert tree["stage"] == "upscale" and [p["stage"] for p in tree["parents"]] == ["unknown"]


def test_malformed_documents_count_as_absent_and_cycles_end(tmp_path) -> None:
    png = tmp_path / "bad.png"
    for bad in ("not json", "[1]", '{"key": "k"}', '{"key": "k", "stage": "s", "parents": [["a"]]}',
                '{"key": "k", "stage": "s", "model": "tiny"}', '{"key": "k", "stage": "s", "ancestors": []}'):
        png.write_bytes(png_bytes(Image.new("RGB", (8, 8)), {"atelier": bad}))
        assert metadata.read_embedded(png) is None, bad
    cyclic = {"key": "a", "stage": "upscale", "parents": [["b", "source"]],
              "ancestors": {"b": {"stage": "face_restore", "parents": [["a", "source"]]}}}
    assert metadata.a1111_parameters(cyclic) is None
    assert metadata.lineage_tree(cyclic, max_depth=3)["parents"][0]["parents"][0]["parents"][0]["parents"] == []


def test_write_delivery_rejects_unknown_formats_and_files_without_lineage(tmp_path) -> None:
    png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(ValueError, match="unknown delivery format"):
        metadata.write_delivery(png, tmp_path / "x.tiff", doc=_chain())
    with pytest.raises(ValueError, match="no atelier lineage"):
        metadata.write_delivery(png, tmp_path / "x.jpg")


def test_lineage_of_a_file_without_lineage_and_without_store_is_a_clean_error(tmp_path) -> None:
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    home = tmp_path / "home"
    home.mkdir()
    res = CliRunner().invoke(app, ["lineage", str(plain), "--home", str(home)])
    assert res.exit_code == 2 and "carries no atelier lineage" in res.output
    res = CliRunner().invoke(app, ["lineage", "0123456789", "--home", str(home)])
    assert res.exit_code == 2 and "no lineage store" in res.output
    assert list(home.iterdir()) == []  # looking does not create a store


# ------------------------------------------------------------------------- end to end, one small run
@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> dict:
    """The session's shared run (``tests.conftest.TINY_BRIEF``); its ``poster`` final (face restore and upscale
    after refine) is copied to a folder of its own."""
    home = tiny_run["home"]
    final = home / "outputs" / "views" / "poster-1.png"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    copy = elsewhere / "poster-1.png"
    shutil.copyfile(final, copy)  # the PNG alone, no sidecar: what a client forwards
    return {"home": home, "final": final, "copy": copy, "empty": tmp_path_factory.mktemp("empty"),
            "runner": CliRunner()}


def _lineage(run, path: Path, home: Path) -> dict:
    res = run["runner"].invoke(app, ["lineage", str(path), "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


def _find(node: dict, stage: str) -> dict | None:
    if node["stage"] == stage:
        return node
    return next((hit for p in node["parents"] if (hit := _find(p, stage)) is not None), None)


def _recipe(node: dict) -> dict:
    """What the store and the file both know about a node, recursively."""
    keep = ("role", "key", "stage", "deliverable", "width", "height", "params", "model")
    return {**{k: node[k] for k in keep}, "parents": [_recipe(p) for p in node["parents"]]}


@pytest.mark.slow  # a campaign run through Prefect
def test_a_copied_final_gives_its_lineage_without_the_database(run) -> None:
    node = _lineage(run, run["copy"], run["empty"])
    assert node["from"] == "embedded metadata" and node["carrier"] == "PNG text chunk"
    assert list(run["empty"].iterdir()) == []  # no store was created there
    chain = []

    def walk(n):
        chain.append(n["stage"])
        for p in n["parents"]:
            walk(p)

    walk(node)
    assert node["stage"] == "upscale"
    assert chain[:5] == ["upscale", "face_restore", "refine", "select", "draft"] and "reference" in chain
    draft = _find(node, "draft")
    assert draft["params"]["prompt"] == "a cup of coffee, morning light" and isinstance(draft["params"]["seed"], int)
    assert len(draft["model"]["weights_sha256"]) == 64
    refs = {p["params"]["source"] for p in _find(node, "refine")["parents"] if p["stage"] == "reference"}
    assert refs and refs <= {"refs/coffee.jpg", "refs/chelsea.jpg", "refs/astronaut.jpg"}
    # The same tree as the store gives for the original, on everything the file can know.
    from_store = _lineage(run, run["final"], run["home"])
    assert from_store["from"] == "store"
    assert _recipe(node) == _recipe(from_store)
    text = run["runner"].invoke(app, ["lineage", str(run["copy"]), "--home", str(run["empty"])],
                                env={"COLUMNS": "200"}).output
    assert "(from embedded metadata: PNG text chunk)" in text and f"seed={draft['params']['seed']}" in text


@pytest.mark.slow  # a campaign run through Prefect
def test_the_final_carries_a1111_parameters_of_its_generation(run) -> None:
    node = _lineage(run, run["copy"], run["empty"])
    draft, refine = _find(node, "draft"), _find(node, "refine")
    with Image.open(run["copy"]) as im:
        parsed = metadata.parse_a1111(im.info["parameters"])
    # the refine (img2img) is the last generation; face restore and upscale are steps after it
    assert parsed["Prompt"] == "a cup of coffee, morning light" and parsed["Negative prompt"] == "watermark"
    assert parsed["Seed"] == str(draft["params"]["seed"]) == str(refine["params"]["seed"])
    assert (parsed["Sampler"], parsed["Steps"], parsed["Denoising strength"]) == ("Euler", "8", "0.6")
    assert (parsed["Size-1"], parsed["Size-2"]) == (str(refine["width"]), str(refine["height"]))
    assert parsed["Model hash"] == refine["model"]["pipeline"]["weights_sha256"][:10]
    assert parsed["Face restoration"] == "GFPGAN"
    assert (parsed["Postprocess upscale to-1"], parsed["Postprocess upscale to-2"]) == ("128", "128")
    # the draft's own file: txt2img with LCM
    with Image.open(run["home"] / _store_path(run, draft["key"])) as im:
        parsed = metadata.parse_a1111(im.info["parameters"])
    assert (parsed["Sampler"], parsed["Steps"], parsed["Seed"]) == ("LCM", "4", str(draft["params"]["seed"]))
    assert "Denoising strength" not in parsed and parsed["Size-1"] == str(draft["width"])


def _store_path(run, key: str) -> str:
    from store import open_store
    from store.schema import Asset

    with open_store(run["home"]).sessions() as s:
        return s.get(Asset, key).path


@pytest.mark.slow  # a campaign run through Prefect
def test_asset_bytes_depend_on_the_recipe_only(run) -> None:
    """The PNG is what its recipe and its ancestors' rows give, re-encoded: no run id, no timings.

    (The asset file in the store; the delivered final is its C2PA-signed copy, with the same chunks.)
    """
    from store import open_store
    from store.schema import RunAsset

    st = open_store(run["home"])
    key = metadata.read_embedded(run["final"]).doc["key"]
    with st.sessions() as s:
        doc = metadata.doc_from_store(s, key)
        run_ids = {ra.run_id for ra in s.query(RunAsset)}
    asset = run["home"] / _store_path(run, key)
    with Image.open(asset) as im:
        chunk = im.info["atelier"]
        pixels = im.copy()
    with Image.open(run["final"]) as im:
        assert im.info["atelier"] == chunk and im.tobytes() == pixels.tobytes()
    assert json.loads(chunk) == doc and not any(r in chunk for r in run_ids)
    assert png_bytes(pixels, metadata.png_text(doc), compress_level=3) == asset.read_bytes()


@pytest.mark.slow  # a campaign run through Prefect
def test_export_writes_a_sidecar_beside_each_final(run) -> None:
    side = metadata.sidecar_path(run["final"])
    with Image.open(run["final"]) as im:
        assert json.loads(side.read_text()) == json.loads(im.info["atelier"])


@pytest.mark.slow  # a campaign run through Prefect
def test_jpeg_and_webp_deliveries_give_the_same_lineage(run, tmp_path) -> None:
    png_node = _lineage(run, run["copy"], run["empty"])
    for suffix in (".jpg", ".webp"):
        out = metadata.write_delivery(run["final"], tmp_path / f"poster-1{suffix}", quality=90)
        assert metadata.sidecar_path(out).exists()
        metadata.sidecar_path(out).unlink()
        node = _lineage(run, out, run["empty"])
        assert node["carrier"] == "XMP" and _recipe(node) == _recipe(png_node)
    # a copy stripped of all metadata still has its sidecar
    stripped = tmp_path / "stripped.jpg"
    with Image.open(run["final"]) as im:
        im.convert("RGB").save(stripped)
    shutil.copyfile(metadata.sidecar_path(run["final"]), metadata.sidecar_path(stripped))
    node = _lineage(run, stripped, run["empty"])
    assert node["carrier"] == "sidecar stripped.jpg.json" and _recipe(node) == _recipe(png_node)
