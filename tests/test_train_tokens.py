"""Specification of ``cachebind train llava-pretrain | llava-finetune``: LLaVA-1.5's stages on
Ray Train from cached patch tokens (CPU, gloo). The projector alone learns captions that the
tokens determine; a run whose training worker is killed part-way resumes from its checkpoint
and ends with exactly the weights and loss curve of an uninterrupted run; the result is LLaVA's
``mm_projector.bin`` and loads back into cachebind's LLaVA path as llava-hf's projector; stage 2
writes a llava-hf directory; SPHINX's mixed projector trains in the same loop."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from llava_checkpoints import PATCHES, reference_llava, write_llava_hf
from ray_kill import MANAGER_SNAPSHOT, kill_after_a_checkpoint
from ray_local import use_local_ray
from train_fixtures import token_caption_table

from cachebind.bind.mixed import load_mixed_projector
from cachebind.config import Settings
from cachebind.errors import WeightsError
from cachebind.inject.llava_load import load_llava
from cachebind.inject.tiny import train_tokenizer
from cachebind.inject.tokenizer import Tokenizer
from cachebind.train.instruct import InstructionError
from cachebind.train.tokens_data import IMAGE_INDEX, conversation_example, plain_example
from cachebind.train.tokens_trainer import make_tokens_plan, run_tokens_training
from cachebind.train.trainer import TrainError, TrainResult

WIDTH = 32  # the small LLaVA's vision width (tests/llava_checkpoints.py)
ROWS = 32
# Global batch 8 from micro-batches of 4 (two accumulated): 4 steps an epoch, 3 epochs.
STEPS = 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokens-train")
    tokenizer = train_tokenizer(root / "tokenizer.model", vocab_size=512)
    llava = write_llava_hf(reference_llava(vocab=Tokenizer(tokenizer).n_words), root / "llava")
    shutil.copy(tokenizer, llava / "tokenizer.model")
    (root / "db").mkdir()
    token_caption_table(root / "db", "clip336", ROWS, PATCHES, WIDTH, also={"dinov2": (4, 16)})
    return {"root": root, "llava": llava, "db": root / "db"}


def settings_for(inputs: dict[str, Path], run_name: str, **train: object) -> Settings:
    return Settings(
        store={"uri": str(inputs["db"]), "table": "images", "vector_dtype": "float32"},
        train={
            "output_dir": str(inputs["root"] / "train"), "run_name": run_name,
            "batch_size": 4, "checkpoint_every": 2, "progress": False, "data_cpus": 0.1,
            **train,
        },
        tokens_train={
            "llava_dir": str(inputs["llava"]), "encoder": "clip336", "pretrain_batch": 8,
            "epochs": 3.0, "pretrain_lr": 5e-2, "max_length": 64,
        },
    )  # fmt: skip


def losses(log: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in log.read_text().splitlines() if line]


def test_a_caption_becomes_bos_the_visual_tokens_and_the_caption_labelled_alone(inputs):
    tok = Tokenizer(inputs["llava"] / "tokenizer.model")
    ids, labels = plain_example(tok, "a red circle", PATCHES, max_length=64)
    caption = tok.encode("a red circle\n", bos=False, eos=False)
    assert ids == [tok.bos_id, *[IMAGE_INDEX] * PATCHES, *caption]
    assert labels == [-100] * (1 + PATCHES) + caption
    cut_ids, cut_labels = plain_example(tok, "a red circle", PATCHES, max_length=PATCHES + 2)
    assert cut_ids == ids[: PATCHES + 2] and cut_labels == labels[: PATCHES + 2]


def test_the_plan_follows_the_recipe_and_refuses_what_it_cannot_train(inputs):
    plan = make_tokens_plan(settings_for(inputs, "plan"), "pretrain", world=1)
    assert (plan.total_steps, plan.steps_per_epoch, plan.accum_iter) == (STEPS, 4, 2)
    assert plan.tokens_column == "patch_tokens_clip336" and (plan.patches, plan.width) == (9, 32)
    assert plan.warmup_epochs == pytest.approx(1 / 4)  # ceil(0.03 x 12) = 1 step
    recipe = Settings().tokens_train  # LLaVA-1.5's pretrain.sh
    assert (recipe.pretrain_lr, recipe.pretrain_batch, recipe.epochs) == (1e-3, 256, 1.0)
    assert (recipe.warmup_ratio, recipe.weight_decay) == (0.03, 0.0)

    imagebind = settings_for(inputs, "plan")
    imagebind.tokens_train.encoder = "imagebind"
    with pytest.raises(TrainError, match="has no patch_tokens "):
        make_tokens_plan(imagebind, "pretrain", world=1)
    odd = settings_for(inputs, "plan", batch_size=3)
    with pytest.raises(TrainError, match="not a multiple of batch_size 3"):
        make_tokens_plan(odd, "pretrain", world=1)
    none = settings_for(inputs, "plan")
    none.tokens_train.llava_dir = None
    with pytest.raises(WeightsError, match="no LLM"):
        make_tokens_plan(none, "pretrain", world=1)


@pytest.fixture(scope="module")
def ray_session():
    use_local_ray(num_cpus=4)


@pytest.fixture(scope="module")
def stage1(inputs, ray_session) -> TrainResult:
    return run_tokens_training(settings_for(inputs, "whole"), "pretrain")


@pytest.mark.slow
def test_stage_1_learns_the_captions_resumes_exactly_and_writes_llavas_projector(inputs, stage1):
    whole = stage1
    curve = losses(whole.log_file)
    assert whole.steps == STEPS and len(curve) == STEPS and whole.effective_batch == 8
    # The LLM is frozen: only the projected tokens can lower the caption loss. An epoch is all
    # 32 rows, so the first and the last epoch's means are over the same examples.
    assert np.mean(curve[-4:]) < np.mean(curve[:4]) - 0.25, curve

    # Killed (SIGKILL to its training worker) once it has a checkpoint: Ray Train restarts
    # the worker, which resumes there and ends where the uninterrupted run ends.
    settings = settings_for(inputs, "killed", max_failures=1)
    out = Path(settings.train.output_dir)
    log, snapshot = out / "killed" / "loss.jsonl", out / "ray" / "killed" / MANAGER_SNAPSHOT
    result: dict[str, TrainResult] = {}
    thread = threading.Thread(
        target=lambda: result.update(out=run_tokens_training(settings, "pretrain")), daemon=True
    )
    thread.start()
    resumed_at, before = kill_after_a_checkpoint(log, snapshot, thread)
    assert 2 <= resumed_at <= len(before) < STEPS, (resumed_at, before)
    thread.join(timeout=900)  # the restarted run's own time, which a busy machine stretches
    assert not thread.is_alive(), "the resumed run did not finish"
    resumed = result["out"]
    lines = log.read_text().splitlines()
    assert lines[:resumed_at] == before[:resumed_at]  # resumed, not restarted
    assert losses(resumed.log_file) == curve
    a = torch.load(resumed.output, weights_only=True)
    b = torch.load(whole.output, weights_only=True)
    assert sorted(a) == [
        "model.mm_projector.0.bias", "model.mm_projector.0.weight",
        "model.mm_projector.2.bias", "model.mm_projector.2.weight",
    ]  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The output is llava-hf's projector once loaded into cachebind's LLaVA path.
    before = load_llava(inputs["llava"])
    model = load_llava(inputs["llava"], projector=whole.output)
    state = model.multi_modal_projector.state_dict()
    for name, index in (("linear_1", 0), ("linear_2", 2)):
        assert torch.equal(state[f"{name}.weight"], b[f"model.mm_projector.{index}.weight"])
        assert torch.equal(state[f"{name}.bias"], b[f"model.mm_projector.{index}.bias"])
    llm_before = before.language_model.state_dict()
    assert all(torch.equal(v, llm_before[k]) for k, v in model.language_model.state_dict().items())


def test_a_conversation_is_labelled_on_its_answers_and_their_end_of_sequence(inputs):
    tok = Tokenizer(inputs["llava"] / "tokenizer.model")
    turns = [("<image>\nWhat colour?", "Red."), ("And the shape?", "A star.")]
    ids, labels = conversation_example(tok, turns, PATCHES, has_image=True, max_length=512)
    assert ids.count(IMAGE_INDEX) == PATCHES and len(ids) == len(labels)
    labelled = [i for i, x in zip(ids, labels, strict=True) if x != -100]
    red, star = tok.encode("Red.", bos=False), tok.encode("A star.", bos=False)
    assert labelled == [*red, tok.eos_id, *star, tok.eos_id]
    assert [x for x in labels if x != -100] == labelled
    text_only, _ = conversation_example(tok, turns, PATCHES, has_image=False, max_length=512)
    assert IMAGE_INDEX not in text_only
    short, _ = conversation_example(tok, turns, PATCHES, has_image=True, max_length=4)
    assert short.count(IMAGE_INDEX) == PATCHES and short[-1] == IMAGE_INDEX  # never cut inside


INSTRUCTIONS = [
    {"image": f"images/img-{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": f"It is {('red', 'green', 'blue', 'white')[i % 4]}."}]}
    for i in range(7)
] + [{"conversations": [{"from": "human", "value": "Hello?"},
                        {"from": "gpt", "value": "Hello."}]}]  # fmt: skip


def stage2_settings(inputs, stage1: TrainResult, run_name: str) -> Settings:
    (inputs["root"] / "instructions.json").write_text(json.dumps(INSTRUCTIONS))
    settings = settings_for(inputs, run_name)
    settings.tokens_train.instructions = inputs["root"] / "instructions.json"
    settings.tokens_train.init_projector = stage1.output
    settings.tokens_train.finetune_batch = 4
    settings.tokens_train.max_length = 256  # the v1 system prompt and two turns
    settings.tokens_train.epochs = 1.0
    return settings


@pytest.mark.slow
def test_stage_2_trains_projector_and_llm_on_instructions_into_a_llava_hf_directory(inputs, stage1):
    items = INSTRUCTIONS
    settings = stage2_settings(inputs, stage1, "stage2")
    result = run_tokens_training(settings, "finetune")
    # 8 items at global batch 4, one epoch (LLaVA's).
    assert result.steps == 2 and len(losses(result.log_file)) == result.steps

    original = load_llava(inputs["llava"])
    trained = load_llava(result.output)  # strict: every tensor present, none left over
    tower = original.vision_tower.state_dict()
    assert all(torch.equal(v, tower[k]) for k, v in trained.vision_tower.state_dict().items())
    llm = original.language_model.state_dict()
    moved = [not torch.equal(v, llm[k]) for k, v in trained.language_model.state_dict().items()]
    assert any(moved)  # the LLM trains in stage 2
    start = torch.load(stage1.output, weights_only=True)["model.mm_projector.0.weight"]
    assert not torch.equal(trained.multi_modal_projector.linear_1.weight, start)

    missing = [{"image": "nowhere.jpg", "conversations": items[0]["conversations"]}]
    (inputs["root"] / "missing.json").write_text(json.dumps(missing))
    settings.tokens_train.instructions = inputs["root"] / "missing.json"
    with pytest.raises(InstructionError, match="not in the cache: \\['nowhere.jpg'\\]"):
        make_tokens_plan(settings, "finetune", world=1)


@pytest.mark.slow
def test_stage_2_with_lora_trains_adapters_and_projector_and_merges_them_into_llava_hf(
    inputs, stage1
):
    settings = stage2_settings(inputs, stage1, "stage2-lora")
    settings.tokens_train.lora_r = 4
    settings.tokens_train.lora_alpha = 8.0
    settings.tokens_train.lora_lr = 5e-2  # a visible update in two steps
    settings.tokens_train.lora_projector_lr = 5e-3
    plan = make_tokens_plan(settings, "finetune", world=1)
    assert (plan.lr, plan.lora_r) == (5e-2, 4) and plan.projector_lr_scale == pytest.approx(0.1)
    result = run_tokens_training(settings, "finetune")
    assert result.steps == 2 and result.lr == 5e-2

    final = torch.load(max(result.checkpoint_dir.glob("checkpoint_*/state.pt")),
                       weights_only=True)["trainable"]  # fmt: skip
    # The checkpoint holds the adapters and the projector, not the frozen LLM.
    assert all(k.startswith("projector.") or k.endswith((".lora_A", ".lora_B")) for k in final)
    original = load_llava(inputs["llava"])
    trained = load_llava(result.output)  # strict: the base's layout, adapters merged
    base = original.language_model.state_dict()
    merged = trained.language_model.state_dict()
    a = final["llm.model.layers.0.self_attn.q_proj.lora_A"]
    b = final["llm.model.layers.0.self_attn.q_proj.lora_B"]
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], base[key] + 2.0 * (b @ a), rtol=1e-6, atol=1e-6)
    assert not torch.equal(merged[key], base[key])
    for unadapted in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(merged[unadapted], base[unadapted])
    start = torch.load(stage1.output, weights_only=True)["model.mm_projector.0.weight"]
    assert not torch.equal(trained.multi_modal_projector.linear_1.weight, start)

    settings.tokens_train.instructions = None
    with pytest.raises(TrainError, match="lora_r is stage 2's"):
        make_tokens_plan(settings, "pretrain", world=1)


@pytest.mark.slow
def test_sphinx_mixed_projector_trains_in_the_stage_1_loop_on_two_cached_encoders(
    inputs, ray_session
):
    settings = settings_for(inputs, "mixed", max_steps=2, checkpoint_every=2, progress=True)
    settings.tokens_train.mix = ["clip336", "dinov2"]  # 3 x 3 and 2 x 2 grids
    settings.tokens_train.mix_side = 3
    plan = make_tokens_plan(settings, "pretrain", world=1)
    assert plan.patches == 9 and plan.mix_columns == ("patch_tokens_clip336", "patch_tokens_dinov2")
    result = run_tokens_training(settings, "pretrain")
    assert result.output.name == "mixed_projector.pth"
    assert all(np.isfinite(losses(result.log_file))) and len(losses(result.log_file)) == 2
    saved = torch.load(result.output, weights_only=True)
    assert saved["channel_order"] == [("clip336", 0, 32), ("dinov2", 32, 48)]
    # What `serve --mixed-projector` loads: the weights and each encoder's recorded layer.
    served = load_mixed_projector(result.output)
    assert [(s.name, s.patches, s.width, s.layer) for s in served.sources] == [
        ("clip336", PATCHES, 32, -2), ("dinov2", 4, 16, -2)
    ]  # fmt: skip
    assert saved["side"] == 3 and saved["state"]["visual_proj.0.weight"].shape == (48, 48)
    start = torch.load(inputs["root"] / "train" / "mixed" / "start.pth", weights_only=True)
    assert not torch.equal(saved["state"]["visual_proj.0.weight"],
                           start["projector"]["visual_proj.0.weight"])  # fmt: skip

    settings.tokens_train.init_projector = result.output
    with pytest.raises(TrainError, match="stage 1 only"):
        make_tokens_plan(settings, "pretrain", world=1)
