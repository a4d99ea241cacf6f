"""Specification of one training step: the same loss and gradients as the released
``LLaMA_adapter.forward`` in train mode (the independent reference), on the trainable sets of
``get_trainable_params``; frozen tensors get no gradient and do not change."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_llama import (
    RefAdapter,
    RefArgs,
    randomize_,
    reference_train_loss,
    reference_trainable,
    released_checkpoints,
)

from cachebind.inject.load import load_adapter_llama
from cachebind.inject.tiny import train_tokenizer
from cachebind.inject.tokenizer import Tokenizer
from cachebind.train.data import collate_captions, epoch_order, worker_offsets
from cachebind.train.export import released_state, to_released
from cachebind.train.params import frozen_snapshot, set_trainability, weight_decay_groups
from cachebind.train.schedule import absolute_lr, learning_rate
from cachebind.train.step import LossModule, caption_loss, make_optimizer, optimizer_step

PHASES = {
    "pretrain": dict(w_bias=False, w_lora=False, bind_variant="rmsnorm"),
    "finetune": dict(w_bias=True, w_lora=True, lora_rank=4, bind_variant="rmsnorm"),
}


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)


def pair(root: Path, tokenizer: Path, phase: str, **kw):
    """(reference, model loaded from the released files of the same weights, tokenizer)."""
    tok = Tokenizer(tokenizer)
    args = RefArgs(vocab_size=tok.n_words, bind_in_dim=48, n_layers=3, **{**PHASES[phase], **kw})
    ref = randomize_(RefAdapter(args), seed=5)
    base, adapter = released_checkpoints(ref)
    (root / "7B").mkdir(parents=True)
    (root / "7B" / "params.json").write_text(json.dumps(args.params_json()))
    torch.save(base, root / "7B" / "consolidated.00.pth")
    shutil.copy(tokenizer, root / "tokenizer.model")
    torch.save(adapter, root / "adapter.pth")
    model, tok, _ = load_adapter_llama(root, root / "adapter.pth")
    return ref, model.train(), tok


def batch_for(tok: Tokenizer, dim: int, seed: int = 0, n: int = 3):
    rng = np.random.default_rng(seed)
    captions = ["a red circle on a blue background", "two dogs", "the sky at night " * 4][:n]
    return collate_captions(tok, rng.standard_normal((n, dim)), captions, max_words=150)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_one_step_matches_the_released_loss_and_gradients(
    tmp_path, tokenizer_path, phase, n_kv_heads
):
    ref, model, tok = pair(tmp_path, tokenizer_path, phase, n_kv_heads=n_kv_heads)
    batch = batch_for(tok, ref.args.bind_in_dim)
    assert (batch.labels[:, 1:] != 0).any() and (batch.labels[:, 1:] == 0).any()

    ref_trainable = reference_trainable(ref, phase)
    for p in ref.parameters():
        p.requires_grad_(False)
    for p in ref_trainable.values():
        p.requires_grad_(True)
    want = reference_train_loss(ref, batch.tokens, batch.labels, batch.f_m)
    want.backward()

    trainable = set_trainability(model, phase)
    got = caption_loss(model, batch)
    got.backward()

    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    # The same trainable set, by the release's names.
    grads = to_released(model, {k: p.grad for k, p in trainable.items()})
    assert set(grads) == set(ref_trainable)
    expected_kinds = {
        "pretrain": ("image_bind_", "prefix_query", "gate"),
        "finetune": ("norm", "bias", "lora"),
    }[phase]
    for kind in expected_kinds:
        assert any(kind in name for name in grads), kind
    for name, p in ref_trainable.items():
        scale = p.grad.abs().max()
        assert scale > 0, name  # every trainable tensor is reached by the loss
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5 * float(scale))
    for name, p in model.named_parameters():
        if name not in trainable:
            assert p.grad is None and not p.requires_grad, name


def test_an_optimiser_step_moves_only_the_trainable_tensors(tmp_path, tokenizer_path):
    _, model, tok = pair(tmp_path, tokenizer_path, "pretrain")
    trainable = set_trainability(model, "pretrain")
    frozen = frozen_snapshot(model)
    before = {k: p.detach().clone() for k, p in trainable.items()}
    optimizer = make_optimizer(trainable, lr=1e-3, weight_decay=0.05)
    module = LossModule(model)
    micro = [batch_for(tok, 48, seed=s, n=2) for s in range(2)]
    optimizer_step(module, optimizer, micro)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    assert all(not torch.equal(before[k], p) for k, p in trainable.items())


def test_accumulating_two_micro_batches_is_one_batch_of_equal_token_counts(
    tmp_path, tokenizer_path
):
    _, model, tok = pair(tmp_path, tokenizer_path, "pretrain")
    trainable = set_trainability(model, "pretrain")
    same = ["a red circle"] * 2  # equal label counts: mean of means == mean
    full = collate_captions(tok, np.eye(2, 48), same, 140)
    halves = [collate_captions(tok, np.eye(2, 48)[i : i + 1], same[i : i + 1], 140) for i in (0, 1)]
    caption_loss(model, full).backward()
    whole = {k: p.grad.clone() for k, p in trainable.items()}
    model.zero_grad(set_to_none=True)
    for h in halves:
        (caption_loss(model, h) / 2).backward()
    for k, p in trainable.items():
        # Equal up to float32 reassociation: the two halves sum the same terms in another order
        # (and each CPU's kernels order them differently), so an element's error scales with the
        # tensor's gradient magnitudes, not its own value: 64 ulps of the largest. A real
        # accumulation bug (a missing 1/2, a dropped micro-batch) is off by half the value.
        scale = whole[k].abs().max().item()
        atol = 64 * torch.finfo(torch.float32).eps * scale
        torch.testing.assert_close(p.grad, whole[k], rtol=1e-5, atol=atol, msg=k)


def test_weight_decay_groups_follow_the_release(tmp_path, tokenizer_path):
    _, model, _ = pair(tmp_path, tokenizer_path, "finetune")
    trainable = set_trainability(model, "finetune")
    no_decay, decay = weight_decay_groups(trainable, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    assert set(released_state(model, "finetune")) >= {"prefix_query.weight"}  # + stage 1's
    ids_no = {id(p) for p in no_decay["params"]}
    for name, p in trainable.items():
        assert (id(p) in ids_no) == (p.ndim == 1 or name.endswith(".bias")), name


def test_schedule_is_warmup_then_half_cycle_cosine():
    kw = dict(lr=4e-4, min_lr=0.0, warmup_epochs=1.0, epochs=3.0)
    assert learning_rate(0.0, **kw) == 0.0
    assert learning_rate(0.5, **kw) == pytest.approx(2e-4)
    assert learning_rate(1.0, **kw) == pytest.approx(4e-4)
    assert learning_rate(2.0, **kw) == pytest.approx(2e-4)
    assert learning_rate(3.0, **kw) == pytest.approx(0.0, abs=1e-12)
    assert absolute_lr(1e-4, 1024) == pytest.approx(4e-4)  # the paper's stage-1 lr


def test_one_worker_with_accumulation_reads_what_two_workers_read():
    order = epoch_order(100, seed=1, epoch=2)
    one = worker_offsets(order, rank=0, world=1, micro_batch=3, accum=2).reshape(-1, 2, 3)
    two = [worker_offsets(order, rank=r, world=2, micro_batch=3, accum=1) for r in (0, 1)]
    for r in (0, 1):
        np.testing.assert_array_equal(one[:, r, :].reshape(-1), two[r])
    assert len(np.unique(one)) == one.size == 16 * 6  # 100 // 6 steps, no row twice
    resumed = worker_offsets(order, rank=0, world=1, micro_batch=3, accum=2, first_step=5)
    np.testing.assert_array_equal(resumed, one[5:].reshape(-1))
    assert not np.array_equal(epoch_order(100, 1, 2), epoch_order(100, 1, 3))


def test_a_finetune_start_trains_and_exports_what_the_loader_reads_back(tmp_path, tokenizer_path):
    """Stage 2 starts from a stage-1 file (bias 0, LoRA l2 0: the same model), trains, and its
    exported file (q / k rows back in Meta's order) loads into the very model it was."""
    from cachebind.train.build import write_start
    from cachebind.train.export import save_released

    ref, _, tok = pair(tmp_path / "base", tokenizer_path, "pretrain", n_kv_heads=2)
    stage1 = tmp_path / "stage1.pth"
    torch.save(released_checkpoints(ref)[1], stage1)
    llama = tmp_path / "base"
    start = write_start(
        tmp_path / "start.pth", llama, "finetune", in_dim=48, init_checkpoint=stage1,
        variant="rmsnorm", lora_rank=4, seed=0,
    )  # fmt: skip
    model, tok, _ = load_adapter_llama(llama, start)
    assert model.cfg.lora_rank == 4 and model.cfg.w_bias
    batch = batch_for(tok, 48)
    with torch.no_grad():
        stage1_model, _, _ = load_adapter_llama(llama, stage1)
        torch.testing.assert_close(caption_loss(model, batch), caption_loss(stage1_model, batch))
    trainable = set_trainability(model.train(), "finetune")
    optimizer = make_optimizer(trainable, lr=1e-2, weight_decay=0.02)
    for _ in range(2):
        optimizer_step(LossModule(model), optimizer, [batch])
    out = save_released(model, "finetune", tmp_path / "out.pth", torch.float32)
    reloaded, _, report = load_adapter_llama(llama, out)
    assert not report.unused
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(
            reloaded(batch.tokens, visual=reloaded.visual_query(batch.f_m)).logits,
            model(batch.tokens, visual=model.visual_query(batch.f_m)).logits,
            rtol=1e-5,
            atol=1e-5,
        )
