"""One format table (cachebind.formats, docs/formats.md): the embedding job and the service
decode the same formats with the same decoder, and every file of a folder source ends in the
table, the errors table or the report's count of sidecars.

The job runs on a local Ray; the service is a real server on 127.0.0.1 (``served``), whose
``/v1/embed`` gets each file's bytes.
"""

from __future__ import annotations

import base64
import tarfile
from pathlib import Path

import fixtures_media as fm
import format_corpus as corpus
import httpx
import lancedb
import numpy as np
import pytest
from builders import embed_settings
from ray_local import use_local_ray

from cachebind import formats
from cachebind.errors import InputError
from cachebind.preprocess import preprocess
from cachebind.sources import list_partitions, read_partition

pytestmark = pytest.mark.served(rows=20)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], int]:
    return corpus.write(tmp_path_factory.mktemp("corpus"))


def outcome_of_bytes(data: bytes) -> str:
    try:
        preprocess("image", data)
    except InputError as exc:
        return exc.reason
    return "ok"


def test_the_table_lists_jfif_jpe_ppm_tga_ico_psd_avif_jpeg2000_and_heic():
    extensions = formats.image_extensions()
    for ext in ("jfif", "jpe", "ppm", "pgm", "pbm", "tga", "ico", "psd", "avif", "jp2", "heic"):
        assert ext in extensions
    assert not set(extensions) & set(formats.unsupported_extensions())
    assert "HEIC/HEIF" in formats.supported_names()


def test_every_file_decodes_or_is_refused_by_its_bytes_with_the_supported_list(folder):
    root, outcomes, _ = folder
    for name, outcome in outcomes.items():
        assert outcome_of_bytes((root / name).read_bytes()) == outcome, name
    with pytest.raises(InputError) as refused:
        preprocess("image", corpus.SVG)
    assert refused.value.reason == "unsupported_format"
    assert "SVG" in refused.value.detail and formats.supported_names() in refused.value.detail


@pytest.mark.parametrize(
    "signature",
    [
        b"\x00\x00\x00\x1cftypavif",
        b"\x00\x00\x00\x18ftypheic",
        b"\x89PNG\r\n\x1a\n",
        b"8BPS\x00\x01",
    ],
    ids=["avif", "heic", "png", "psd"],
)
def test_bytes_that_claim_a_supported_format_and_break_are_undecodable_not_unsupported(signature):
    raw = signature + fm.garbage(1024, seed=3)
    assert outcome_of_bytes(raw) in ("undecodable", "truncated")


def test_a_heic_without_its_plugin_is_refused_by_name_not_as_undecodable(folder, monkeypatch):
    root, _, _ = folder
    heic = (root / "photo_heic.heic").read_bytes()
    assert formats.sniff_non_image(heic[:4096]) is None  # installed: HEIC decodes
    without = tuple(
        formats.ImageFormat(f.name, f.pillow, f.extensions, "no_such_plugin")
        if f.plugin == formats.HEIF_PLUGIN
        else f
        for f in formats.TABLE
    )
    monkeypatch.setattr(formats, "TABLE", without)
    assert "heic" in formats.unsupported_extensions()
    assert "heic" not in formats.image_extensions()
    assert "HEIC/HEIF" not in formats.supported_names()
    assert formats.sniff_non_image(heic[:4096]) == "HEIC/HEIF (without the no_such_plugin plug-in)"


def test_the_folder_reader_accounts_for_every_file(folder):
    root, outcomes, sidecars = folder
    partitions = list_partitions(f"folder:{root}?chunk_size=4")
    samples = [s for p in partitions for s in read_partition(p)]
    assert sorted(s.key for s in samples) == sorted(corpus.key_of(n) for n in outcomes)
    assert sum(p.non_samples for p in partitions) == sidecars
    assert len(outcomes) + sidecars == sum(1 for f in root.rglob("*") if f.is_file())
    by_key = {s.key: s for s in samples}
    assert by_key["photo_jpg"].caption == "a caption"
    assert by_key["photo_png"].url == "http://example.com/p.png"
    for name in ("drawing.svg", "paper.pdf", "figure.eps", "next.jxl"):
        sample = by_key[corpus.key_of(name)]
        assert sample.image is None and sample.error[0] == "unsupported_format"
        assert formats.supported_names() in sample.error[1]


def test_tar_members_get_the_same_reasons_as_folder_files(folder, tmp_path):
    root, outcomes, _ = folder
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name in sorted(outcomes):
            if name.rpartition(".")[2] in formats.image_extensions() + ("svg", "pdf"):
                tar.add(root / name, arcname=name)
    samples = [s for p in list_partitions(f"webdataset:{shard}") for s in read_partition(p)]
    assert len(samples) == sum(
        n.rpartition(".")[2] in formats.image_extensions() + ("svg", "pdf") for n in outcomes
    )
    for sample in samples:
        name = next(n for n in outcomes if corpus.key_of(n) == sample.key)
        found = sample.error[0] if sample.error else outcome_of_bytes(sample.image)
        assert found == outcomes[name], name


def test_the_job_and_the_service_agree_file_by_file(folder, served, tmp_path):
    pytest.importorskip("ray")
    from jobs.embed import run_embed

    root, outcomes, sidecars = folder
    settings = embed_settings(tmp_path / "db")
    use_local_ray(num_cpus=2)
    report = run_embed(f"folder:{root}?chunk_size=8", settings, progress=False)
    db = lancedb.connect(settings.store.uri)
    rows = {r["key"]: r for r in db.open_table(settings.store.table).to_arrow().to_pylist()}
    errors = db.open_table(settings.store.errors_table_name).to_arrow().to_pylist()
    job = {key: "ok" for key in rows} | {e["key"]: e["reason"] for e in errors}
    assert job == {corpus.key_of(name): outcome for name, outcome in outcomes.items()}
    assert report.rows_written + report.errors_written == len(outcomes)
    assert report.non_samples == sidecars
    unsupported = [e for e in errors if e["reason"] == "unsupported_format"]
    assert all(formats.supported_names() in e["detail"] for e in unsupported)

    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        for name, outcome in outcomes.items():
            data = base64.b64encode((root / name).read_bytes()).decode()
            r = http.post("/v1/embed", json={"inputs": [{"modality": "image", "data": data}]})
            if outcome != "ok":
                assert (r.status_code, r.json()["error"]) == (422, outcome), name
                continue
            assert r.status_code == 200, (name, r.text)
            api = np.asarray(r.json()["items"][0]["embedding"], dtype=np.float32)
            stored = np.asarray(rows[corpus.key_of(name)]["vector"], dtype=np.float32)
            # The job stores pixels in half precision: the same image, a hair apart.
            assert float(api @ stored) / float(np.linalg.norm(stored)) > 0.999, name


def test_the_service_embeds_images_whose_profile_is_garbage_or_huge_as_untagged(served):
    import io

    import colour_profiles as icc

    def jpeg(profile: bytes | None) -> str:
        out = io.BytesIO()
        corpus.picture(3, (96, 64)).save(out, "JPEG", quality=95, icc_profile=profile)
        return base64.b64encode(out.getvalue()).decode()

    huge = icc.swapped_red_green() + bytes(5 * 2**20)  # over input.max_icc_profile_bytes
    inputs = {
        "untagged": jpeg(None),
        "garbage": jpeg(bytes(range(256)) * 40),
        "huge": jpeg(len(huge).to_bytes(4, "big") + huge[4:]),
        "swapped": jpeg(icc.swapped_red_green()),
    }
    headers = {"Authorization": f"Bearer {served.svc.user_key}"}
    vectors = {}
    with httpx.Client(base_url=served.url, headers=headers, timeout=120) as http:
        for name, data in inputs.items():
            r = http.post("/v1/embed", json={"inputs": [{"modality": "image", "data": data}]})
            assert r.status_code == 200, (name, r.text)
            vectors[name] = np.asarray(r.json()["items"][0]["embedding"])
    # The encoder saw the same pixels for the ignored profiles, other ones for the honoured.
    np.testing.assert_allclose(vectors["garbage"], vectors["untagged"], atol=1e-6)
    np.testing.assert_allclose(vectors["huge"], vectors["untagged"], atol=1e-6)
    assert not np.allclose(vectors["swapped"], vectors["untagged"], atol=1e-3)
