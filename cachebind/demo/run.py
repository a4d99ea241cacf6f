"""The demo: generated data → Ray embedding job → LanceDB → published index → HTTP service.

Every stage is the real one; only the data (and, without the official checkpoint, the weights)
are generated.
"""

from __future__ import annotations

import secrets
import shlex
import time
from pathlib import Path
from typing import Any

from cachebind.config import Settings
from cachebind.modalities import Modality

SMALL_PRESET = "small"
"""Random-weight preset used when the official checkpoint is absent: the huge architecture's
shape of outputs (1024-d) with a fraction of its depth and width, so the demo runs on 2 cores."""


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def find_checkpoint(settings: Settings, explicit: str | None) -> Path | None:
    """The official imagebind_huge.pth: --checkpoint, the configuration, or the weights dir."""
    for candidate in (explicit, settings.encoder.checkpoint):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            return path
    default = settings.weights.dir / "imagebind_huge.pth"
    return default if default.is_file() else None


def demo_settings(settings: Settings, out: Path, checkpoint: Path | None) -> Settings:
    """The user's settings, pointed at the demo's output directory."""
    encoder = (
        {"preset": "huge", "checkpoint": str(checkpoint)}
        if checkpoint
        else {"preset": SMALL_PRESET, "checkpoint": None}
    )
    values = settings.model_dump()
    values["encoder"].update(encoder)
    values["store"].update(uri=str(out / "lancedb"), table="images")
    values["index"].update(dir=str(out / "index"))
    values["embed"].update(num_encoders=1)
    return Settings.model_validate(values)


def print_hits(title: str, result: dict[str, Any]) -> None:
    print(f"\n{title}")
    for rank, hit in enumerate(result["results"], 1):
        print(f"  {rank}. score {hit['score']:+.4f}  {hit['key']}  {hit.get('caption', '')}")


def run_demo(
    settings: Settings,
    out: Path,
    checkpoint: str | None = None,
    images: int = 240,
    train: bool = False,
) -> int:
    import indexing
    from cachebind.client import CachebindClient, input_item
    from cachebind.demo.data import write_collection
    from cachebind.inject import build_tiny_llm
    from cachebind.published.manifest import Manifest
    from cachebind.serve import start_server
    from cachebind.serve.auth import write_key_file
    from cachebind.store import CacheTable
    from jobs.embed import run_embed

    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = find_checkpoint(settings, checkpoint)
    settings = demo_settings(settings, out, ckpt)

    _banner("cachebind demo")
    if ckpt:
        print(f"Using the official ImageBind checkpoint {ckpt}.")
    else:
        print(
            "No ImageBind checkpoint found: this demo runs on RANDOMLY INITIALISED small "
            "weights,\nso the pipeline is real but the neighbours below carry no meaning.\n"
            "To use the real model (4.8 GB, licensed CC BY-NC 4.0, non-commercial use only):\n"
            "    cachebind weights download imagebind_huge\n"
            f"which saves it to {settings.weights.dir}/imagebind_huge.pth "
            "(or pass --checkpoint / set CACHEBIND_ENCODER__CHECKPOINT)."
        )

    _banner("1/6 writing a generated sample collection (img2dataset webdataset layout)")
    collection = write_collection(out / "data", count=images)
    print(
        f"{images} captioned images in {len(collection.shards)} shards, "
        f"{len(collection.audio)} audio clips, 1 video -> {collection.root}"
    )

    _banner("2/6 embedding job (local Ray -> ImageBind vision encoder -> LanceDB)")
    run_embed(collection.webdataset_spec, settings)  # prints its own report

    _banner("3/6 building, verifying and publishing the index")
    manifest = Manifest.from_json(indexing.build(CacheTable.open(settings.store), settings.index))
    recall = ", ".join(f"recall@{k} {v:.3f}" for k, v in manifest.recall.items())
    print(
        f"published version {manifest.version}: {manifest.index_key} over "
        f"{manifest.table.row_count} rows (table version {manifest.table.version}); "
        f"measured {recall}"
    )

    _banner("4/6 a small LLaMA with ImageBind-LLM's gated injection")
    if train:
        _train(settings, out)
    else:
        # Written in Meta's layout and the released ImageBind-LLM layout, then loaded by the
        # service through the same conversion code as the real 7B checkpoints.
        llm_dir = out / "llm"
        build_tiny_llm(llm_dir, visual_dim=_encoder_dim(settings))
        settings.llm.llama_dir = llm_dir
        settings.llm.adapter_checkpoint = llm_dir / "imagebind_llm_tiny.pth"
        print(f"tiny LLaMA (Meta layout) + adapter checkpoint (released layout) in {llm_dir}")

    _banner("5/6 starting the HTTP service on 127.0.0.1")
    user_key, admin_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    settings.serve.api_keys_file = write_key_file(out / "keys" / "users.txt", [user_key])
    settings.serve.admin_keys_file = write_key_file(out / "keys" / "admins.txt", [admin_key])
    settings.serve.port = 0
    server = start_server(settings)
    try:
        print(f"service at {server.url} (docs: {server.url}/docs, search page: {server.url}/)")
        with CachebindClient(server.url, api_key=user_key) as client:
            _queries(client, collection, input_item)
    finally:
        _banner("6/6 shutting the service down")
        server.stop()
        print("stopped cleanly")

    _banner("outputs")
    print(f"collection:  {collection.root}")
    print(
        f"table:       {settings.store.uri} (table {settings.store.table!r}, errors table "
        f"{settings.store.errors_table_name!r})"
    )
    print(f"index:       {settings.index.dir} (CURRENT -> {manifest.version})")
    print(f"LLM files:   {out / 'llm'}")
    print("\nto serve what the demo built (its user key is in no file; make one with")
    print(f"`cachebind keys create {settings.serve.api_keys_file}`):")
    print(f"    {serve_command(settings)}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def serve_command(settings: Settings, port: int = 8000) -> str:
    """The ``cachebind serve`` command line that serves the table, index, encoder, LLM and
    keys of ``settings`` (each as a flag, quoted for a POSIX shell)."""
    flags: list[tuple[str, object]] = [
        ("--table-uri", settings.store.uri),
        ("--table", settings.store.table),
        ("--index-dir", settings.index.dir),
        ("--preset", settings.encoder.preset),
        ("--checkpoint", settings.encoder.checkpoint),
        ("--llama-dir", settings.llm.llama_dir),
        ("--adapter-checkpoint", settings.llm.adapter_checkpoint),
        ("--api-keys-file", settings.serve.api_keys_file),
        ("--admin-keys-file", settings.serve.admin_keys_file),
        ("--port", port),
    ]
    words = ["cachebind", "serve"]
    for flag, value in flags:
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _train(settings: Settings, out: Path) -> None:
    """Stage 1 from the cache (``cachebind.train`` on Ray Train), then serve its result."""
    from cachebind.demo.train import train_on_cache

    print(
        "training stage 1 from the cache (bind network, prefix queries, gates; the base LLaMA "
        "frozen),\none image of each shape held out in every 3rd colour/background setting, "
        "~1.5 minutes on the CPU ..."
    )
    demo = train_on_cache(settings, out)
    u, t = demo.untrained, demo.trained
    print(f"{demo.steps} steps in {demo.train_seconds:.0f} s; held-out images ({t.n}):")
    print(
        f"  right colour word: untrained {u.colour:.0%} (chance {demo.chance_colour:.0%}) -> "
        f"trained {t.colour:.0%}\n  right shape word:  untrained {u.shape:.0%} (chance "
        f"{demo.chance_shape:.0%}) -> trained {t.shape:.0%}"
    )
    for want, got in t.examples:
        print(f"  {want!r:40} -> {got!r}")
    settings.llm.llama_dir = demo.llama_dir
    settings.llm.adapter_checkpoint = demo.adapter
    print(f"the service loads the trained {demo.adapter} (released layout) unchanged")


def _encoder_dim(settings: Settings) -> int:
    from cachebind.store import CacheTable

    return CacheTable.open(settings.store).dim


def _queries(client: Any, collection: Any, input_item: Any) -> None:
    text = "a red circle on a blue background"
    print_hits(f"text query: {text!r}", client.search([input_item(Modality.TEXT, text)], k=5))

    audio = collection.audio["low_tone"]
    print_hits(
        f"audio query: {audio.name}",
        client.search([input_item(Modality.AUDIO, audio.read_bytes())], k=5),
    )

    mix = [
        input_item(Modality.IMAGE, collection.query_image.read_bytes(), weight=1.0),
        input_item(Modality.AUDIO, collection.audio["chirp"].read_bytes(), weight=0.5),
    ]
    print_hits(
        f"weighted mix: {collection.query_image.name} x1.0 + chirp.wav x0.5",
        client.search(mix, k=5),
    )

    video = [input_item(Modality.VIDEO, collection.video.read_bytes())]
    print_hits(f"video query: {collection.video.name}", client.search(video, k=5))

    cloud = [input_item(Modality.POINT, collection.point_cloud.read_bytes())]
    print_hits(
        f"point-cloud query (Point-Bind): {collection.point_cloud.name}", client.search(cloud, k=5)
    )

    enhanced = client.enhance([input_item(Modality.TEXT, text)], k=10, t=20.0, alpha=0.5)
    print(f"\ncache-enhanced embedding of {text!r} (k=10, t=20, alpha=0.5):")
    print(
        f"  cosine(F_M, F~_M) = {enhanced['cosine_to_query']:.4f}: the blend moved the query "
        f"by {1 - enhanced['cosine_to_query']:.4f} in cosine distance"
    )
    print("  neighbours that drove it (softmax weight, similarity):")
    for n in enhanced["neighbours"][:5]:
        print(f"    {n['weight']:.3f}  {n['similarity']:+.4f}  {n['key']}  {n.get('caption', '')}")

    prompt = "Describe the picture."
    print(f"\ngeneration: {prompt!r} + image query (streamed)\n  ", end="")
    items = [input_item(Modality.IMAGE, collection.query_image.read_bytes())]
    for piece in client.generate(prompt, items, max_new_tokens=24, temperature=0.0):
        print(piece, end="", flush=True)
    print("\n  (a tiny LLaMA: without --train its weights are random and the words are noise)")
