"""Pruning criteria (prune.importance): hand-computed scores on small layers, the pruned sets they
must give, and the criteria's bad settings."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from distill.checks import validate
from distill.compress.prune.callback import Pruning
from distill.compress.prune.importance import collect_gradients, row_scores, weight_scores
from distill.errors import ConfigError

from .conftest import FAST

# One Linear(4 -> 1) without bias, w = [4, 3, 2, 1]. The loss of a batch is the sum of the outputs, so
# its gradient is the batch's column sums: g_1 = [1, 0, 10, 0], g_2 = [1, 0, -10, 3].
W = [4.0, 3.0, 2.0, 1.0]
BATCHES = [torch.tensor([[1.0, 0.0, 10.0, 0.0]]), torch.tensor([[1.0, 0.0, -10.0, 3.0]])]
# Σg = [2, 0, 0, 3], Σg² = [2, 0, 200, 9]
EXPECTED = {
    "magnitude": [4.0, 3.0, 2.0, 1.0],  # |w|
    "taylor": [8.0, 0.0, 0.0, 3.0],  # |w · Σ_b g_b|
    "snip": [8.0, 0.0, 0.0, 3.0],  # the same, at initialisation
    "fisher": [16.0, 0.0, 400.0, 4.5],  # ½ Σ_b (w · g_b)²
}
PRUNED_AT_HALF = {"magnitude": {2, 3}, "taylor": {1, 2}, "fisher": {1, 3}}


def _pruned_linear(importance: str, scope: str = "global") -> tuple[Pruning, nn.Module]:
    model = nn.Sequential(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([W]))
    cb = Pruning("unstructured", 0.5, scope=scope, schedule="oneshot", importance=importance, prune_classifier=True)
    cb.setup(None, SimpleNamespace(student=model), "fit")
    return cb, model


def _gradients(cb: Pruning, model: nn.Module):
    return collect_gradients(lambda x: model(x).sum(), model, cb._scored_tensors(), BATCHES)


@pytest.mark.parametrize("importance", ["magnitude", "taylor", "snip", "fisher"])
def test_unstructured_scores_are_the_formulas(importance):
    cb, model = _pruned_linear(importance)
    grads = _gradients(cb, model)
    assert grads.batches == 2
    scores = weight_scores(importance, model[0].weight, grads.of(model[0], "weight"))
    assert scores.flatten().tolist() == pytest.approx(EXPECTED[importance])


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("importance", ["magnitude", "taylor", "fisher"])
def test_each_criterion_prunes_the_weights_it_scores_lowest(importance, scope):
    # Built so that magnitude, Taylor and Fisher must each prune a different pair.
    cb, model = _pruned_linear(importance, scope)
    grads = None if importance == "magnitude" else _gradients(cb, model)
    cb.prune_to(0.5, grads)
    pruned = {i for i, m in enumerate(model[0].weight_mask.flatten().tolist()) if m == 0}
    assert pruned == PRUNED_AT_HALF[importance]
    assert model[0].weight.flatten()[sorted(pruned)].abs().sum() == 0


def test_gradients_leave_no_trace_in_the_model():
    # BatchNorm running statistics and the global random state are as before; no .grad is written.
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    cb = Pruning("unstructured", 0.5, schedule="oneshot", importance="taylor")
    cb.setup(None, SimpleNamespace(student=model), "fit")
    batches = [torch.randn(8, 4) for _ in range(3)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    grads = collect_gradients(lambda x: model(x).sum(), model, cb._scored_tensors(), batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert grads.batches == 3 and all(t.abs().sum() > 0 for t in grads.total.values())


def test_random_is_seeded_and_reaches_the_sparsity():
    masks = []
    for seed in (0, 0, 1):
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        cb = Pruning("unstructured", 0.5, schedule="oneshot", importance="random", seed=seed)
        cb.setup(None, SimpleNamespace(student=model), "fit")
        cb.prune_to(0.5)
        masks.append(model[0].weight_mask.clone())
        assert cb.current_sparsity == pytest.approx(0.5, abs=1e-3)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


# --- structured -----------------------------------------------------------------------------------

def test_structured_taylor_and_hessian_rows_are_the_formulas():
    rows = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    total = torch.tensor([[2.0, 1.0], [-1.0, 4.0]])  # Σ_b g_b
    squares = torch.tensor([[4.0, 2.0], [1.0, 8.0]])  # Σ_b g_b², over B = 2 batches
    alive = torch.ones(2, dtype=torch.bool)
    taylor = row_scores("taylor", rows, (total, squares), alive, batches=2)
    hessian = row_scores("hessian", rows, (total, squares), alive, batches=2)
    assert taylor.tolist() == pytest.approx([1 * 2 + 2 * 1, 3 * 1 + 0.5 * 4])  # Σ_row |w · Σg|
    assert hessian.tolist() == pytest.approx([(1 * 4 + 4 * 2) / 2, (9 * 1 + 0.25 * 8) / 2])  # Σ_row w² · Σg² / B


def test_structured_taylor_matches_torch_pruning_on_the_root_layer():
    tp = pytest.importorskip("torch_pruning")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3))
    x = torch.randn(5, 3, 8, 8)
    model(x).square().sum().backward()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    group = graph.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    reference = tp.importance.GroupTaylorImportance(group_reduction="first", normalizer=None)(group)
    w, g = model[0].weight.flatten(1), model[0].weight.grad.flatten(1)
    ours = row_scores("taylor", w, (g, g * g), torch.ones(6, dtype=torch.bool))
    assert ours.tolist() == pytest.approx(reference.tolist(), rel=1e-5)


def _points_net() -> nn.Module:
    # Linear(2 -> 5): its five filters are the points (10,10) (the geometric median of the five),
    # (11,10), (9,10), (10,11), (10,9). The median has the largest norm but one; (9,10) and (10,9) the smallest.
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[10.0, 10.0], [11.0, 10.0], [9.0, 10.0], [10.0, 11.0], [10.0, 9.0]]))
        model[1].bias.zero_()
    return model


def test_fpgm_scores_are_the_sums_of_distances_and_it_prunes_the_geometric_median():
    model = _points_net()
    scores = row_scores("fpgm", model[1].weight, None, torch.ones(5, dtype=torch.bool))
    assert scores.tolist() == pytest.approx([4.0, 1 + 2 + 2 * math.sqrt(2)] + [1 + 2 + 2 * math.sqrt(2)] * 3)
    for importance, expected in (("fpgm", 0), ("magnitude", None)):
        model = _points_net()
        cb = Pruning("structured", 0.2, scope="layer", schedule="oneshot", importance=importance, sample_shape=(1, 1, 2))
        cb.setup(None, SimpleNamespace(student=model), "fit")
        cb.prune_to(0.2)
        dead = cb.pruned_channels()["1"]
        assert len(dead) == 1
        if expected is not None:
            assert dead == [expected]
        else:
            assert dead[0] in (2, 4)  # the smallest norms


def test_structured_random_is_seeded_and_prunes_the_fraction_of_each_group():
    pruned = []
    for seed in (0, 0, 1, 2):
        model = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        cb = Pruning("structured", 0.5, scope="layer", schedule="oneshot", importance="random", seed=seed, sample_shape=(1, 2, 2))
        cb.setup(None, SimpleNamespace(student=model), "fit")
        cb.prune_to(0.5)
        pruned.append(sorted(cb.pruned_channels()["1"]))
        assert len(pruned[-1]) == 8
    assert pruned[0] == pruned[1] and pruned[0] != pruned[2] and pruned[2] != pruned[3]


def test_a_gradual_event_that_adds_no_channel_draws_no_gradients_and_is_no_error():
    # 50 % of 5 channels rounds to 2 at both 0.45 and 0.5: the second event prunes nothing, needs no gradients.
    model = _points_net()
    cb = Pruning("structured", 0.5, scope="layer", schedule="gradual", end_epoch=2, importance="taylor", sample_shape=(1, 1, 2))
    cb.setup(None, SimpleNamespace(student=model), "fit")
    grads = collect_gradients(lambda x: model(x).square().sum(), model, cb._scored_tensors(), [torch.randn(4, 1, 1, 2)])
    cb.prune_to(0.45, grads)
    assert len(cb.pruned_channels()["1"]) == 2
    assert not cb._prunes_any(0.5)
    cb.prune_to(0.5, None)
    assert len(cb.pruned_channels()["1"]) == 2


def test_fpgm_measures_distances_among_live_filters_only():
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    alive = torch.tensor([False, True, True])
    assert row_scores("fpgm", rows, None, alive).tolist() == pytest.approx([1 + 5, 0 + 4, 4 + 0])


# --- bad settings ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    (["prune.method=unstructured", "prune.importance=obd"], "prune.importance=obd is not a criterion of prune.method=unstructured; choose from: magnitude, taylor, fisher, snip, random"),
    (["prune.method=unstructured", "prune.importance=fpgm"], "prune.importance=fpgm does not apply to prune.method=unstructured; choose from: magnitude, taylor, fisher, snip, random"),
    (["prune.method=structured", "prune.scope=layer", "prune.importance=fisher"], "prune.importance=fisher does not apply to prune.method=structured; choose from: magnitude, taylor, hessian, fpgm, random"),
    (["prune.method=unstructured", "prune.importance=taylor", "prune.importance_batches=0"], "prune.importance_batches"),
    (["prune.method=unstructured", "prune.importance=snip"], "prune.importance=snip scores the weights at initialisation"),
    (["prune.method=unstructured", "prune.importance=snip", "prune.schedule=oneshot", "prune.start_epoch=1"], "prune.importance=snip"),
])
def test_bad_criteria_are_named_before_training(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(make_cfg(*overrides, "prune.end_epoch=2"))
    assert str(info.value).startswith(message), str(info.value)


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize(("method", "importance"), [("structured", "taylor"), ("unstructured", "snip")])
def test_a_run_prunes_by_the_gradients_of_its_distillation_loss(make_cfg, method, importance):
    from distill.pipeline import run

    summary = run(make_cfg(*FAST, "teacher=resnet18", "student=cnn", f"prune.method={method}", "prune.scope=layer",
                           f"prune.importance={importance}", "prune.schedule=oneshot", "prune.amount=0.5",
                           "prune.importance_batches=2", "measure.latency=off"))
    student = summary["student"]
    assert student["prune_importance"] == importance and student["prune_method"] == method
    assert student["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The same run by magnitude prunes other weights: the criterion, not only its name, reached the masks.
    from distill.compress.prune.sparse_format import decode

    def masks(summary: dict) -> dict[str, torch.Tensor]:
        state = decode(torch.load(Path(summary["run_dir"]) / "student_sparse.pt", weights_only=True)["state"])
        return {k: v != 0 for k, v in state.items() if k.endswith("weight")}

    ours = masks(summary)  # read before the next run writes its own file
    theirs = masks(run(make_cfg(*FAST, "teacher=resnet18", "student=cnn", f"prune.method={method}", "prune.scope=layer",
                                "prune.schedule=oneshot", "prune.amount=0.5", "measure.latency=off")))
    assert ours.keys() == theirs.keys()
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_scaled_loss_gives_the_unscaled_gradients():
    """Under fp16 mixed precision the importance passes scale the loss as the GradScaler does (no
    underflow in half precision) and divide the scale back out."""
    cb, model = _pruned_linear("taylor")
    plain = _gradients(cb, model)
    scaled = collect_gradients(lambda x: model(x).sum() * 2.0**16, model, cb._scored_tensors(), BATCHES, loss_scale=2.0**16)
    key = id(model[0].weight_orig)
    assert torch.equal(scaled.total[key], plain.total[key]) and torch.equal(scaled.squares[key], plain.squares[key])


def test_an_overflowing_loss_scale_is_retaken_unscaled(caplog):
    """Under fp16 mixed precision (a GradScaler: Lightning has one on CUDA only) the importance passes
    scale the loss by its scale; one that overflows (the untuned first scale at an epoch-0 event, here
    forced to 2^127) makes them take the gradients again unscaled, not fail the run."""
    import contextlib

    cb, model = _pruned_linear("taylor")
    data = [(x[0], torch.tensor(0)) for x in BATCHES]
    scaler = SimpleNamespace(get_scale=lambda: 2.0**127, is_enabled=lambda: True)
    plugin = SimpleNamespace(scaler=scaler, convert_input=lambda b: b, train_step_context=contextlib.nullcontext)
    trainer = SimpleNamespace(train_dataloader=torch.utils.data.DataLoader(data, batch_size=1), world_size=1, global_rank=0,
                              precision_plugin=plugin, strategy=SimpleNamespace(batch_to_device=lambda b, d: b), current_epoch=0)
    module = SimpleNamespace(student=model, device="cpu", distill_loss=SimpleNamespace(epoch=0),
                             _on_before_batch_transfer=lambda b, i: b, loss_terms=lambda batch: ({"loss": model(batch[0]).sum()},))
    cb.importance_batches = 2
    with caplog.at_level("WARNING", logger="distill.compress.prune.callback"):
        grads = cb._gradients(trainer, module, event=0)
    assert "overflowed at loss scale 1.70141e+38; taken again unscaled" in caplog.text
    key = id(model[0].weight_orig)
    assert grads.total[key].tolist() == [[2.0, 0.0, 0.0, 3.0]]  # Σ_b g_b of the two batches, unscaled
