"""C2PA content credentials for delivered finals: "this image is AI-generated, by this model, from these".

A final's manifest (c2pa-python, one ``Builder`` per file) holds:
- a ``c2pa.created`` action with ``digitalSourceType`` trainedAlgorithmicMedia (IPTC) and the generating
  model as its software agent;
- ``org.atelier.lineage``: the final's lineage key and the identity (weights hash) of every model in its chain;
- its kept draft (``parentOf`` is not allowed on a creation, so ``componentOf``) and the mood-board
  references (``inputTo``) as ingredients, each titled with its file name and carrying its lineage key as
  ``instance_id`` (``atelier:<key>``), so a reader can match them against the lineage store.

Signing uses a certificate the user configures (``ATELIER_C2PA_CERT``: PEM chain, end-entity first;
``ATELIER_C2PA_KEY``: its PEM private key; ``ATELIER_C2PA_ALG``: es256 default, ps256, ...;
``ATELIER_C2PA_TSA_URL``: optional RFC 3161 time-stamp authority). Without one, atelier signs with a
*local test certificate* it generates once under ``<home>/c2pa/`` (a test CA and an end-entity it
issues). That CA is in no trust list: validators report the signature as structurally valid but
untrusted, which is right for a demo and wrong for production. ``ATELIER_C2PA=off`` disables signing.

c2pa-python and cryptography are imported inside functions (the CLI imports this module).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
LINEAGE_LABEL = "org.atelier.lineage"
TEST_CERT_NOTE = "atelier local test certificate: NOT TRUSTED, for demos and tests only"
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


@dataclass(frozen=True)
class SigningConfig:
    cert_chain: Path  # PEM, end-entity certificate first, then its issuers (not the root)
    private_key: Path  # PEM (PKCS#8)
    alg: str = "es256"
    tsa_url: str | None = None
    test_certificate: bool = False  # the generated local test CA: never trusted anywhere


@dataclass(frozen=True)
class Ingredient:
    key: str  # lineage key of the asset
    path: Path  # its file
    relationship: str  # componentOf | inputTo
    title: str


# ------------------------------------------------------------------------------- configuration
def signing_config(home: Path) -> SigningConfig | None:
    """The signer from the environment, else the home's local test certificate (made on first use).

    None when ``ATELIER_C2PA=off``. A half-configured signer (a cert without a key) is a usage error.
    """
    from atelier.errors import UsageError

    if os.environ.get("ATELIER_C2PA", "").lower() in ("off", "0", "false", "no"):
        return None
    cert, key = os.environ.get("ATELIER_C2PA_CERT"), os.environ.get("ATELIER_C2PA_KEY")
    alg = os.environ.get("ATELIER_C2PA_ALG", "es256").lower()
    tsa = os.environ.get("ATELIER_C2PA_TSA_URL") or None
    if bool(cert) != bool(key):
        raise UsageError("ATELIER_C2PA_CERT and ATELIER_C2PA_KEY: set both (PEM chain and its private key) or neither")
    if cert:
        for name, value in (("ATELIER_C2PA_CERT", cert), ("ATELIER_C2PA_KEY", key)):
            if not Path(value).is_file():
                raise UsageError(f"{name}: {value}: no such file")
        return SigningConfig(Path(cert), Path(key), alg, tsa)
    folder = Path(home) / "c2pa"
    chain, pkey = folder / "test-chain.pem", folder / "test-key.pem"
    if not (chain.is_file() and pkey.is_file()):
        _make_test_certificate_once(folder)
    return SigningConfig(chain, pkey, "es256", None, test_certificate=True)


def _make_test_certificate_once(folder: Path) -> None:
    """Generate the test certificate in a private folder, then rename it into place: concurrent runs on
    one home never mix one run's chain with another's key; the first rename wins, the others use it."""
    import shutil
    import tempfile

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".c2pa.", dir=folder.parent))
    try:
        write_test_certificate(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # made meanwhile by another run (or left incomplete: replace that)
            if not ((folder / "test-chain.pem").is_file() and (folder / "test-key.pem").is_file()):
                shutil.rmtree(folder, ignore_errors=True)
                os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_test_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A local test CA and an ES256 end-entity certificate it issues, as C2PA requires of a signer.

    C2PA rejects self-signed signing certificates: the end-entity must be issued by a CA, have the
    digitalSignature key usage and an allowed extended key usage (here emailProtection and
    documentSigning), and carry subject / authority key identifiers. Returns (chain, key, CA cert);
    the chain holds the end-entity then the CA. Written atomically; the key is 0600.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    ca_key, ee_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "atelier (local test, NOT TRUSTED)"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_name = name("atelier local test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    ee = (x509.CertificateBuilder().subject_name(name("atelier local test signer")).issuer_name(ca.subject)
          .public_key(ee_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                       crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION,
                                                x509.ObjectIdentifier("1.3.6.1.5.5.7.3.36")]),  # documentSigning
                         critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ee_key.public_key()), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "test-chain.pem": ee.public_bytes(pem) + ca.public_bytes(pem),
        "test-ca.pem": ca.public_bytes(pem),
        "test-key.pem": ee_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        "README.txt": (f"{TEST_CERT_NOTE}.\nGenerated by atelier to sign C2PA manifests when no certificate is "
                       "configured\n(ATELIER_C2PA_CERT / ATELIER_C2PA_KEY). Its CA is in no trust list: validators "
                       "report\nmanifests signed with it as untrusted.\n").encode(),
    }
    for fname, data in files.items():
        tmp = folder / f".{fname}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if "key" in fname else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, folder / fname)
    return folder / "test-chain.pem", folder / "test-key.pem", folder / "test-ca.pem"


# ------------------------------------------------------------------------------------- signing
def manifest_definition(title: str, mime: str, model: dict | None, lineage_key: str, models: list[dict]) -> dict:
    """The manifest JSON for a final: created by a trained model, with atelier's lineage assertion."""
    from atelier import __version__

    agent = {"name": _model_name(model) or "atelier"}
    return {
        "claim_generator_info": [{"name": "atelier", "version": __version__}],
        "title": title,
        "format": mime,
        "assertions": [
            {"label": "c2pa.actions.v2",
             "data": {"actions": [{"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                                   "softwareAgent": agent}]}},
            {"label": LINEAGE_LABEL, "data": {"key": lineage_key, "model": model, "models": models}},
        ],
    }


def final_credentials(session: Any, path_of: Any, key: str, title: str) -> tuple[dict, list[Ingredient]]:
    """The manifest definition and ingredients of final ``key``, from the lineage store.

    ``path_of`` maps a stored asset path to a local file (``store.files.path``).

    Ingredients: the draft the final grew from (following source / init parents) and every mood-board
    reference in its ancestry. The declared model is the nearest generation's (refine or inpaint);
    ``models`` lists every model identity in the chain (drafting, CLIP, IP-Adapter, face, upscale).
    """
    from atelier.metadata import GENERATIVE
    from store import queries

    root = queries.ancestry(session, key)
    models: dict[str, dict] = {}
    refs: dict[str, Ingredient] = {}

    def visit(node: dict) -> None:
        a = node["asset"]
        for m in _identities(a.model):
            models.setdefault(json.dumps(m, sort_keys=True), m)
        if a.stage == "reference" and a.key not in refs:
            source = Path(a.params.get("source") or a.path).name
            refs[a.key] = Ingredient(a.key, path_of(a.path), "inputTo", f"mood-board reference {source}")
        for p in node["parents"]:
            visit(p)

    visit(root)
    node, model, draft = root, None, None
    while node is not None:
        a = node["asset"]
        if model is None and a.stage in GENERATIVE:
            model = (a.model or {}).get("pipeline", a.model)
        if a.stage == "draft":
            draft = Ingredient(a.key, path_of(a.path), "componentOf", f"draft seed {a.params.get('seed')}")
        node = next((p for p in node["parents"] if p["role"] in ("source", "init")), None)
    ingredients = ([draft] if draft else []) + list(refs.values())
    manifest = manifest_definition(title, MIME.get(Path(root["asset"].path).suffix.lower(), "image/png"), model, key,
                                   list(models.values()))
    return manifest, ingredients


def _identities(model: dict | None) -> list[dict]:
    """A model identity, or each sub-identity of a composite one ({"pipeline": ..., "ip_adapter": ...})."""
    if not model:
        return []
    if "name" in model:
        return [model]
    return [m for sub in model.values() if isinstance(sub, dict) for m in _identities(sub)]


def sign_file(source: Path, target: Path, config: SigningConfig, manifest: dict,
              ingredients: list[Ingredient]) -> Path:
    """Write ``target``: ``source``'s bytes with a signed C2PA manifest embedded. ``source`` is not touched."""
    import c2pa

    # 1. Check inputs
    source, target = Path(source), Path(target)
    mime = MIME.get(source.suffix.lower())
    if mime is None:
        raise ValueError(f"{source}: no C2PA format for {source.suffix!r}; known: {', '.join(MIME)}")
    # 2. The signer (the key stays in this process: C2paSignerInfo signs natively)
    info = c2pa.C2paSignerInfo(config.alg.encode(), config.cert_chain.read_bytes(), config.private_key.read_bytes(),
                               config.tsa_url.encode() if config.tsa_url else None)
    signer = c2pa.Signer.from_info(info)
    # 3. The manifest and its ingredients
    tmp = target.with_name(f".{target.name}.{os.getpid()}.c2pa.tmp")
    try:
        with c2pa.Builder(manifest) as builder:
            for ing in ingredients:
                with open(ing.path, "rb") as f:
                    builder.add_ingredient({"title": ing.title, "relationship": ing.relationship,
                                            "instance_id": f"atelier:{ing.key}"},
                                           MIME.get(ing.path.suffix.lower(), "image/png"), f)
            # 4. Sign into a temp file, move it into place
            with open(source, "rb") as src, open(tmp, "w+b") as dst:
                builder.sign(signer, mime, src, dst)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        signer.close()
    return target


def sign_file_once(source: Path, target: Path, config: SigningConfig, manifest: dict,
                   ingredients: list[Ingredient], stamps: Path) -> bool:
    """``sign_file``, unless ``target`` already is this very signing; returns whether it signed.

    A signature is new each time (a time, a random manifest id), so re-signing an unchanged final would
    rewrite a 4K file on every re-run. A stamp in ``stamps`` records what the delivered file was signed from
    (source file, manifest, ingredients, signer) and the signed file's sha256; when both still match, the
    file is left as it is. Source assets are content-addressed (their name is their sha256), so the name
    stands for the bytes.
    """
    import hashlib

    from store.files import file_sha256

    source, target = Path(source), Path(target)
    recipe = hashlib.sha256(json.dumps({
        "source": source.name, "source_size": source.stat().st_size, "manifest": manifest,
        "ingredients": [[i.key, i.path.name, i.relationship, i.title] for i in ingredients],
        "cert_chain": hashlib.sha256(config.cert_chain.read_bytes()).hexdigest(),
        "private_key": hashlib.sha256(config.private_key.read_bytes()).hexdigest(),
        "alg": config.alg, "tsa_url": config.tsa_url,
    }, sort_keys=True, default=str).encode()).hexdigest()
    stamp = Path(stamps) / f"{hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:32]}.json"
    if target.is_file() and stamp.is_file():
        try:
            done = json.loads(stamp.read_text(encoding="utf-8"))
        except ValueError:
            done = {}
        if done.get("recipe") == recipe and done.get("sha256") == file_sha256(target):
            return False
    sign_file(source, target, config, manifest, ingredients)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"target": str(target), "recipe": recipe, "sha256": file_sha256(target)}),
                   encoding="utf-8")
    os.replace(tmp, stamp)
    return True


# ------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Credentials:
    manifest: dict  # the active manifest as c2pa-python reports it
    validation_state: str | None  # Invalid | Valid | Trusted
    validation_errors: list[dict]  # failure codes (an untrusted signer shows here when trust is checked)
    signer: str | None  # the certificate's issuer / common name as the manifest reports it

    @property
    def ingredient_keys(self) -> list[str]:
        return [i["instance_id"].removeprefix("atelier:") for i in self.manifest.get("ingredients", [])
                if str(i.get("instance_id", "")).startswith("atelier:")]

    @property
    def lineage(self) -> dict | None:
        return next((a["data"] for a in self.manifest.get("assertions", []) if a.get("label") == LINEAGE_LABEL), None)

    def actions(self) -> list[dict]:
        return [act for a in self.manifest.get("assertions", []) if a.get("label", "").startswith("c2pa.actions")
                for act in a["data"].get("actions", [])]


def read_credentials(path: Path, trust_anchors: Path | None = None) -> Credentials | None:
    """The C2PA manifest ``path`` carries, validated; None when it carries none.

    With ``trust_anchors`` (PEM), the signer is also checked against them ("Trusted" when it chains to one).
    """
    import c2pa

    path = Path(path)
    mime = MIME.get(path.suffix.lower())
    if mime is None:
        return None
    context = None
    if trust_anchors is not None:
        settings = c2pa.Settings.from_dict({"verify": {"verify_trust": True},
                                            "trust": {"trust_anchors": Path(trust_anchors).read_text()}})
        context = c2pa.Context(settings)
    try:
        with open(path, "rb") as f:
            reader = c2pa.Reader(mime, f, context=context) if context is not None else c2pa.Reader(mime, f)
            with reader:
                store = json.loads(reader.json())
    except c2pa.C2paError as exc:
        if "ManifestNotFound" in type(exc).__name__ or "ManifestNotFound" in str(exc):
            return None
        raise
    active = store["manifests"][store["active_manifest"]]
    results = store.get("validation_results", {}).get("activeManifest", {})
    sig = active.get("signature_info") or {}
    return Credentials(active, store.get("validation_state"), list(results.get("failure", [])),
                       sig.get("common_name") or sig.get("issuer"))


def _model_name(model: dict | None) -> str | None:
    if not model:
        return None
    return model.get("name") or (model.get("pipeline") or {}).get("name")
