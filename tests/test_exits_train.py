"""Exit-head training: the distillation loss, exact resume from a checkpoint, and agreement."""
from __future__ import annotations

import pytest
import torch

from ctxdraft.selfdraft.base.errors import CtxdraftError
from ctxdraft.selfdraft.drafting.exit_head import ExitHead
from ctxdraft.selfdraft.learning.exit_train import ExitTrainConfig, agreement, distill_loss, train_head
from ctxdraft.selfdraft.learning.head_data import build_examples
from ctxdraft.selfdraft.runtime.target import load_target


def test_distill_loss_zero_exactly_when_exit_equals_teacher():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    logits[:, :8] += 20.0  # ids 0..7 are every row's top 8
    top_logp, top_ids = logits.log_softmax(-1).topk(8, -1)
    assert distill_loss(logits, top_ids, top_logp) < 1e-5
    assert distill_loss(torch.randn(5, 40, generator=g), top_ids, top_logp) > 0.01
    # Reduced vocabulary: ids 0..7 plus three others are kept; the teacher renormalised on the kept ids is the
    # exit's distribution over them up to the e^-20 mass of the extra ids.
    keep = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 10, 20, 30])
    local_of = torch.full((40,), -1)
    local_of[keep] = torch.arange(len(keep))
    assert distill_loss(logits[:, keep], top_ids, top_logp, local_of) < 1e-5
    assert distill_loss(torch.randn(5, len(keep), generator=g), top_ids, top_logp, local_of) > 0.01


def test_distill_loss_renormalises_on_kept_ids():
    # The teacher puts half its mass on id 3, which the draft vocabulary drops: the loss must treat the rest as
    # the whole distribution (an exit matching the renormalised teacher has zero loss).
    teacher_logp = torch.tensor([[0.5, 0.25, 0.25]]).log()
    teacher_ids = torch.tensor([[3, 0, 1]])
    local_of = torch.tensor([0, 1, 2, -1])  # ids 0, 1, 2 kept; 3 dropped
    exit_logits = torch.tensor([[0.0, 0.0, -1e9]])  # 0.5 / 0.5 on ids 0 and 1
    assert distill_loss(exit_logits, teacher_ids, teacher_logp, local_of) == pytest.approx(0.0, abs=1e-6)
    lopsided = torch.tensor([[2.0, 0.0, -1e9]])
    assert distill_loss(lopsided, teacher_ids, teacher_logp, local_of) > 0.05


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    target = load_target(tiny_model_dir)
    rows = [{"id": i, "domain": "d", "prompt": p} for i, p in enumerate(["abc abc abc", "hello there", "1 2 3 1 2"])]
    return target, build_examples(target, rows, [2], max_prompt_tokens=64, new_tokens=8, topk=8, extend=2)


@pytest.mark.parametrize("kind", ["linear", "layer"])
def test_resumed_training_equals_uninterrupted(examples, tmp_path, kind):
    target, exs = examples
    config = ExitTrainConfig(layers=[2], head=kind, steps=40, batch_size=64)

    def fresh():
        torch.manual_seed(0)
        return ExitHead(target.model, 2, kind)

    whole = fresh()
    train_head(whole, exs, config, tmp_path / "whole.safetensors")

    class Stop(Exception):
        pass

    def stop_at_30(stage, done, total):
        if done == 30:
            raise Stop

    ckpt = tmp_path / "cut.safetensors"
    with pytest.raises(Stop):
        train_head(fresh(), exs, config, ckpt, progress=stop_at_30)  # checkpointed at step 25, killed at 30
    resumed = fresh()
    config.resume = True
    info = train_head(resumed, exs, config, ckpt)
    assert info["steps"] == 40
    for name, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert not torch.equal(whole.state_dict()["norm.weight"], fresh().state_dict()["norm.weight"])  # it trained


def test_agreement_counts_matches_with_the_target(examples):
    target, exs = examples
    head = ExitHead(target.model, 2, "linear")
    result = agreement(head, exs)
    assert 0 <= result["agreement"] <= 1
    assert result["num_positions"] == sum(ex.num_positions for ex in exs)
    assert result["num_continuation_positions"] == sum(ex.num_positions - ex.tp.prompt_len for ex in exs)
    # A head that is the target's own last layers agrees everywhere: the exit at L-1 with the last layer as head.
    perfect = ExitHead(target.model, target.num_layers - 1, "layer")
    exs_top = build_examples(target, [ex.row for ex in exs], [target.num_layers - 1], max_prompt_tokens=64,
                             new_tokens=8, topk=8, extend=2)
    assert agreement(perfect, exs_top)["agreement"] == 1.0


@pytest.mark.parametrize("field, value, message", [
    ("steps", True, "--steps must be an integer, got True"),
    ("steps", -1, "--steps must be >= 0"),
    ("eval_frac", float("nan"), "--eval-frac must be a finite number"),
    ("draft_lens", [2, True], "--draft-lens .* must be an integer, got True"),
    ("thresholds", [0.5, float("nan")], "--thresholds .* must be a finite number"),
    ("layers", [True], "--layers must be an integer"),
    ("ttt_steps", 0, "--ttt-steps must be >= 1"),  # a feature head's setting
    ("decay", float("nan"), "decay must be a finite number"),
])
def test_exit_train_config_refuses(field, value, message):
    config = ExitTrainConfig(layers=[1, 2], head="feature" if field in ("ttt_steps", "decay") else "linear")
    setattr(config, field, value)
    with pytest.raises(CtxdraftError, match=message):
        config.validate(num_layers=4, vocab_size=100)
