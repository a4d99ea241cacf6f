"""`cachebind train` flags become the [train] section of Settings (flags beat file and env)."""

from __future__ import annotations

from cachebind.cli import build_parser, overrides_from
from cachebind.config import load_config


def test_train_flags_override_the_train_section(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBIND_TRAIN__BATCH_SIZE", "2")
    monkeypatch.setenv("CACHEBIND_TRAIN__ACCUM_ITER", "5")
    args = build_parser().parse_args(
        ["train", "pretrain", "--llama-dir", str(tmp_path), "--batch-size", "3",
         "--num-workers", "2", "--use-gpu", "no", "--no-progress", "--table", "imgs"]
    )  # fmt: skip
    settings = load_config(None, **overrides_from(args))
    assert args.phase == "pretrain"
    t = settings.train
    assert (t.batch_size, t.accum_iter, t.num_workers, t.use_gpu) == (3, 5, 2, "no")
    assert t.llama_dir == tmp_path and t.progress is False
    assert settings.store.table == "imgs"
