"""The command line: one subcommand per stage, each documented, flags mapped onto Settings."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cachebind.cli import build_parser, overrides_from, parse_input
from cachebind.modalities import Modality

STAGES = [
    "embed",
    "index",
    "serve",
    "search",
    "enhance",
    "generate",
    "weights",
    "demo",
    "config",
    "keys",
    "store",
]


@pytest.mark.parametrize("command", STAGES)
def test_every_subcommand_explains_itself(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: cachebind {command}" in text
    assert len(text.splitlines()) > 5


def test_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cachebind.cli", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    for command in STAGES:
        assert command in done.stdout


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("text:a red circle", (Modality.TEXT, "a red circle", 1.0)),
        ("text:a dog@0.5", (Modality.TEXT, "a dog", 0.5)),
        ("photo.JPG", (Modality.IMAGE, "photo.JPG", 1.0)),
        ("rain.wav@2", (Modality.AUDIO, "rain.wav", 2.0)),
        ("clip.webm", (Modality.VIDEO, "clip.webm", 1.0)),
        ("depth:scan.png", (Modality.DEPTH, "scan.png", 1.0)),
        ("imu:walk.csv@0.25", (Modality.IMU, "walk.csv", 0.25)),
        ("chair.ply", (Modality.POINT, "chair.ply", 1.0)),
        ("point:scan.npy", (Modality.POINT, "scan.npy", 1.0)),
        ("text:me@example.com", (Modality.TEXT, "me@example.com", 1.0)),
    ],
)
def test_query_inputs(spec: str, expected: tuple) -> None:
    assert parse_input(spec) == expected


def test_unknown_input_kind_is_explained() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="MODALITY:VALUE"):
        parse_input("notes.docx")


def test_flags_become_settings_overrides() -> None:
    args = build_parser().parse_args(
        ["embed", "/data/cc3m", "--table-uri", "/tmp/db", "--batch-size", "32", "--no-thumbnails"]
    )
    assert overrides_from(args) == {
        "store": {"uri": "/tmp/db"},
        "embed": {"batch_size": 32, "thumbnails": False},
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["embed", "src"], {"store", "encoder"}),
        # index add checks the table was embedded by the configured encoder.
        (["index"], {"store", "index", "encoder"}),
        (["index", "add"], {"store", "index", "encoder"}),
        (["serve"], {"store", "index", "encoder"}),
    ],
)
def test_shared_options_set_the_same_settings_in_every_subcommand(argv, expected) -> None:
    shared = {
        "store": ["--table-uri", "s3://bucket/db", "--table", "cc3m"],
        "index": ["--index-dir", "/srv/index"],
        "encoder": ["--preset", "tiny", "--checkpoint", "/w/imagebind_huge.pth"],
    }
    flags = [flag for section in sorted(expected) for flag in shared[section]]
    overrides = overrides_from(build_parser().parse_args([*argv, *flags]))
    want = {
        "store": {"uri": "s3://bucket/db", "table": "cc3m"},
        "index": {"dir": "/srv/index"},
        "encoder": {"preset": "tiny", "checkpoint": "/w/imagebind_huge.pth"},
    }
    assert overrides == {section: want[section] for section in expected}
    for section in set(shared) - expected:  # and only where they mean something
        with pytest.raises(SystemExit):
            build_parser().parse_args([*argv, *shared[section]])


def test_keys_create_stores_only_the_hash(tmp_path, capsys) -> None:
    from cachebind.cli import main
    from cachebind.serve.auth import KeyStore, Role

    keys_file = tmp_path / "users.keys"
    assert main(["keys", "create", str(keys_file)]) == 0
    key = capsys.readouterr().out.strip()
    assert key and key not in keys_file.read_text()
    assert keys_file.read_text().startswith("sha256:")
    assert KeyStore.from_files(keys_file, None).role(key) == Role.USER


def test_weights_list_and_path_name_the_license_and_location(tmp_path, capsys) -> None:
    from cachebind.cli import main

    assert main(["weights", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "imagebind_huge" in out and "CC BY-NC 4.0" in out and "not downloaded" in out
    assert main(["weights", "path", "imagebind_huge", "--dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "imagebind_huge.pth")


def test_an_unreachable_service_is_a_message_not_a_traceback(capsys) -> None:
    from cachebind.cli import main

    code = main(["search", "--text", "a dog", "--url", "http://127.0.0.1:9"])
    assert code == 2
    assert "cannot reach the service" in capsys.readouterr().err


def test_the_demos_serve_command_reproduces_what_the_demo_served(tmp_path, monkeypatch) -> None:
    import shlex

    from cachebind.config import Settings, load_config
    from cachebind.demo.run import demo_settings, serve_command

    monkeypatch.delenv("CACHEBIND_CONFIG", raising=False)
    out = tmp_path / "demo out"  # a space: the command must quote it
    served = demo_settings(Settings(), out, None)
    served.llm.llama_dir = out / "llm"
    served.llm.adapter_checkpoint = out / "llm" / "adapter.pth"
    served.serve.api_keys_file = out / "keys" / "users.txt"
    served.serve.admin_keys_file = out / "keys" / "admins.txt"
    words = shlex.split(serve_command(served, port=8123))
    assert words[:2] == ["cachebind", "serve"]
    got = load_config(None, **overrides_from(build_parser().parse_args(words[1:])))
    for section, fields in {
        "store": ("uri", "table"),
        "index": ("dir",),
        "encoder": ("preset", "checkpoint"),
        "llm": ("llama_dir", "adapter_checkpoint"),
        "serve": ("api_keys_file", "admin_keys_file"),
    }.items():
        for name in fields:
            want = getattr(getattr(served, section), name)
            have = getattr(getattr(got, section), name)
            assert str(have) == str(want), f"{section}.{name}"
    assert got.serve.port == 8123


def test_python_m_cachebind_is_the_cli_and_takes_the_config_after_the_stage(tmp_path) -> None:
    """What ``ray job submit -- python -m cachebind index build --config F`` runs: a fresh
    process, its own configuration file, the published manifest as JSON on stdout."""
    import json

    from tables import make_images_table

    import indexing

    store = make_images_table(tmp_path / "db", 600, 16, seed=0)
    config = tmp_path / "cachebind.toml"
    config.write_text(
        f'[store]\nuri = "{store.uri}"\n[index]\ndir = "{tmp_path / "index"}"\nuse_gpu = "no"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "cachebind", "index", "build", "--config", str(config)]
        + ["--json", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads(done.stdout)
    assert manifest["version"] == indexing.current_version(tmp_path / "index") == "v000001"
    assert manifest["ntotal"] == 600 and manifest["shards"] == 1


def test_the_ray_job_entry_modules_parse_their_flags_with_the_cli(capsys) -> None:
    import jobs.train
    from jobs.embed.__main__ import main as embed_main

    def usage(run, argv: list[str]) -> str:
        with pytest.raises(SystemExit) as exit_info:
            run(argv)
        assert exit_info.value.code == 0
        return capsys.readouterr().out

    train_help = usage(jobs.train.main, ["--help"])
    assert train_help == usage(lambda argv: build_parser().parse_args(argv), ["train", "--help"])
    assert "--num-workers" in train_help and "--config" in train_help
    embed_help = usage(embed_main, ["--help"])
    assert embed_help.startswith("usage: cachebind embed")
    for flag in ("--address", "--uri", "--flush-rows", "--no-progress", "--views", "--config"):
        assert flag in embed_help
