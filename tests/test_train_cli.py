"""`cachebind train` flags become the [train] section of Settings (flags beat file and env)."""

from __future__ import annotations

from cachebind.cli import build_parser, overrides_from
from cachebind.cli.training import tokens_defaults
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


def test_llava_flags_fill_the_tokens_train_section_and_share_the_base_llm_and_instructions(
    tmp_path,
):
    args = build_parser().parse_args(
        ["train", "llava-pretrain", "--llama-dir", str(tmp_path), "--tokens-encoder", "dinov2",
         "--global-batch", "64", "--init-projector", str(tmp_path / "mm_projector.bin"),
         "--instructions", str(tmp_path / "mix.json")]
    )  # fmt: skip
    settings = load_config(None, **overrides_from(args))
    tokens_defaults(settings)
    tt = settings.tokens_train
    assert (args.phase, tt.encoder, tt.pretrain_batch) == ("llava-pretrain", "dinov2", 64)
    assert tt.init_projector == tmp_path / "mm_projector.bin"
    assert tt.llama_dir == tmp_path and tt.instructions == tmp_path / "mix.json"
    assert tt.finetune_batch == 128 and tt.finetune_lr == 2e-5  # LLaVA's finetune.sh

    llava = build_parser().parse_args(["train", "llava-finetune", "--llava-dir", str(tmp_path)])
    settings = load_config(None, **overrides_from(llava))
    tokens_defaults(settings)
    assert settings.tokens_train.llava_dir == tmp_path and settings.tokens_train.llama_dir is None
    assert settings.tokens_train.lora_r == 0  # full stage 2 unless asked
    lora = build_parser().parse_args(["train", "llava-finetune", "--lora-r", "128"])
    tt = load_config(None, **overrides_from(lora)).tokens_train
    # LLaVA-1.5's finetune_lora.sh: r 128, alpha 256, lr 2e-4, mm_projector_lr 2e-5.
    assert (tt.lora_r, tt.lora_alpha, tt.lora_lr, tt.lora_projector_lr) == (128, 256, 2e-4, 2e-5)
