"""Contrastive representation distillation against references computed here from RepDistiller's
``ContrastMemory`` / ``ContrastLoss`` formulas (numpy loops in float64), its memory update and Z, the
'exact' negatives, gradients, the checkpointed state, the distributed memories, and its bad input."""

import math
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distill.distillation.features.crd import (
    CRDTerm,
    contrast_scores,
    nce_loss,
    normalization_constant,
    sample_negatives,
    update_memory,
)

LABELS = torch.tensor([0, 1, 2, 0, 1, 0, 2, 0, 1, 0, 2, 1])  # N = 12: five of class 0, four of 1, three of 2
DIM, K, T, M = 4, 5, 0.1, 0.5


def _ref_scores(memory, emb, rows, t):
    """ContrastMemory: exp(<memory[rows[i, k]], emb[i]> / T), before Z."""
    return np.array([[math.exp(float(memory[rows[i, k]] @ emb[i]) / t) for k in range(rows.shape[1])]
                     for i in range(rows.shape[0])])


def _ref_loss(p, n_data):
    """ContrastLoss: positive at column 0, Pn = 1/n_data, eps 1e-7, summed, divided by the batch size."""
    eps, k = 1e-7, p.shape[1] - 1
    total = 0.0
    for i in range(p.shape[0]):
        total += math.log(p[i, 0] / (p[i, 0] + k / n_data + eps))
        for j in range(1, k + 1):
            total += math.log((k / n_data) / (p[i, j] + k / n_data + eps))
    return -total / p.shape[0]


def _ref_update(memory, index, emb, m):
    out = memory.copy()
    for i, row in enumerate(index):
        v = m * memory[row] + (1 - m) * emb[i]
        out[row] = v / np.linalg.norm(v)
    return out


def _ref_embed(linear, f):
    e = f.double().numpy() @ linear.weight.detach().double().numpy().T + linear.bias.detach().double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _features(seed=0, n=3, ds=6, dt=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ds, generator=g), torch.randn(n, dt, generator=g)


def _term(seed=0, **kwargs):
    torch.manual_seed(seed)  # the heads' initialisation
    term = CRDTerm(**{"feat_dim": DIM, "nce_k": K, "nce_t": T, "momentum": M, **kwargs})
    term.set_data(LABELS)
    s, t = _features()
    term.build([s], [t])
    return term


@pytest.mark.parametrize("dim", [3, 1], ids=["whole-memory-product", "gathered-rows"])
def test_scores_and_nce_loss_match_repdistiller_on_fixed_inputs(dim):
    g = torch.Generator().manual_seed(1)
    memory = torch.rand(6, dim, generator=g) * 2 - 1
    emb = torch.nn.functional.normalize(torch.randn(2, dim, generator=g), dim=1)
    rows = torch.tensor([[4, 0, 1, 1, 5], [2, 3, 0, 5, 4]])  # the positive (the sample itself) at column 0
    z = 2.5
    scores = contrast_scores(memory, emb, rows, 0.2)
    ref = _ref_scores(memory.double().numpy(), emb.double().numpy(), rows.numpy(), 0.2)
    np.testing.assert_allclose(scores.double().numpy(), ref, rtol=1e-5)
    assert nce_loss(scores / z, 6).item() == pytest.approx(_ref_loss(ref / z, 6), rel=1e-5)
    assert normalization_constant(scores, 6).item() == pytest.approx(ref.mean() * 6, rel=1e-5)


def test_term_matches_the_reference_and_fixes_z_on_the_first_call():
    term = _term()
    n = len(LABELS)
    mem_s, mem_t = term.memory_s.double().numpy().copy(), term.memory_t.double().numpy().copy()
    stdv = 1 / math.sqrt(DIM / 3)  # ContrastMemory's initialisation
    assert mem_s.shape == (n, DIM) and np.abs(mem_s).max() <= stdv and np.abs(mem_t).max() <= stdv
    assert not term.z_set
    z = None
    for step, index in enumerate([torch.tensor([0, 4, 10]), torch.tensor([6, 1, 4])]):
        s, t = _features(seed=10 + step)
        torch.manual_seed(100 + step)  # the term draws its negatives from the global RNG, as sample_negatives does
        rows = sample_negatives(index, LABELS, K).numpy()
        torch.manual_seed(100 + step)
        out = term([s], [t], index)
        e_s, e_t = _ref_embed(term.embed_s, s), _ref_embed(term.embed_t, t)
        s_s = _ref_scores(mem_t, e_s, rows, T)  # student anchor against the teacher memory
        s_t = _ref_scores(mem_s, e_t, rows, T)  # teacher anchor against the student memory
        if z is None:
            z = (s_s.mean() * n, s_t.mean() * n)
        np.testing.assert_allclose(term.z.double().numpy(), z, rtol=1e-5)  # set on the first call, then fixed
        assert term.z_set
        assert out["crd"].item() == pytest.approx(_ref_loss(s_s / z[0], n) + _ref_loss(s_t / z[1], n), rel=1e-4)
        mem_s, mem_t = _ref_update(mem_s, index.numpy(), e_s, M), _ref_update(mem_t, index.numpy(), e_t, M)
        np.testing.assert_allclose(term.memory_s.double().numpy(), mem_s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(term.memory_t.double().numpy(), mem_t, rtol=1e-5, atol=1e-6)


def test_memory_update_is_momentum_then_renormalised_for_the_batch_rows_only():
    g = torch.Generator().manual_seed(2)
    memory = torch.rand(7, 3, generator=g)
    emb = torch.nn.functional.normalize(torch.randn(3, 3, generator=g), dim=1)
    index = torch.tensor([5, 0, 2])
    expected = _ref_update(memory.double().numpy(), index.numpy(), emb.double().numpy(), 0.3)
    update_memory(memory, index, emb, 0.3)
    np.testing.assert_allclose(memory.double().numpy(), expected, rtol=1e-6)
    untouched = [1, 3, 4, 6]
    np.testing.assert_array_equal(memory[untouched].numpy(), torch.rand(7, 3, generator=torch.Generator().manual_seed(2))[untouched].numpy())
    # An index given twice in one update (a distributed sampler's padding) takes its last embedding.
    old = memory.clone()
    update_memory(memory, torch.tensor([1, 1]), emb[:2], 0.3)
    expected = 0.3 * old[1] + 0.7 * emb[1]
    torch.testing.assert_close(memory[1], expected / expected.norm())


def test_exact_negatives_come_from_other_classes_with_the_sample_itself_first():
    index = torch.tensor([0, 1, 2, 3, 6, 11])
    pools = {c: {i for i, y in enumerate(LABELS.tolist()) if y != c} for c in range(3)}
    rows = sample_negatives(index, LABELS, 7, generator=torch.Generator().manual_seed(0))
    assert rows.shape == (6, 8)
    assert rows[:, 0].tolist() == index.tolist()
    for i, row in zip(index.tolist(), rows.tolist(), strict=True):
        c = int(LABELS[i])
        assert set(row[1:]) <= pools[c]
        assert len(set(row[1:])) == 7  # k <= every pool (7, 8, 9 samples): without replacement
    # k above the pool (7 negatives of class 0): with replacement, still only other classes, every one drawn.
    rows = sample_negatives(torch.tensor([0] * 50), LABELS, 20, generator=torch.Generator().manual_seed(0))
    assert set(rows[:, 1:].flatten().tolist()) == pools[0]
    # Uniform over the pool, and reproducible from the generator.
    rows = sample_negatives(torch.tensor([0] * 400), LABELS, 3, generator=torch.Generator().manual_seed(1))
    counts = np.bincount(rows[:, 1:].flatten().numpy(), minlength=len(LABELS))[sorted(pools[0])]
    assert counts.min() > 0.7 * counts.mean()
    again = sample_negatives(torch.tensor([0] * 400), LABELS, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rows, again)


@pytest.mark.parametrize("dim, k", [(DIM, K), (2, 2)], ids=["whole-memory-product", "gathered-rows"])  # N > (K+1) d
def test_gradients_reach_the_heads_and_student_features_not_the_teacher_features(dim, k):
    term = _term(feat_dim=dim, nce_k=k)
    s, t = _features(seed=3)
    s.requires_grad_(True)
    t.requires_grad_(True)  # arrives detached in training; the term detaches it regardless
    term([s], [t], torch.tensor([2, 3, 8]))["crd"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    for head in (term.embed_s, term.embed_t):  # both heads train (RepDistiller's trainable_list)
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert not term.memory_s.requires_grad and not term.memory_t.requires_grad


def test_state_dict_round_trip_gives_the_same_loss():
    term = _term()
    for step in range(2):
        s, t = _features(seed=20 + step)
        term([s], [t], torch.tensor([step, 5, 9]))
    state = term.state_dict()
    assert set(state) == {"_extra_state", "embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    assert not list(term.buffers())  # no buffer: DDP would broadcast the memories at every step
    fresh = _term(seed=123)  # other heads; the memories start the same whatever the global RNG
    assert torch.equal(fresh.memory_s, _term(seed=7).memory_s)
    assert not torch.equal(fresh.embed_s.weight, term.embed_s.weight)
    fresh.load_state_dict(state)
    s, t = _features(seed=30)
    index = torch.tensor([1, 6, 11])
    torch.manual_seed(5)
    expected = term([s], [t], index)["crd"]
    torch.manual_seed(5)
    got = fresh([s], [t], index)["crd"]
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(fresh.memory_s, term.memory_s) and torch.equal(fresh.z, term.z)
    # Re-attached with the same split (set_data and build again): the memories, Z and heads stay.
    def flat(state):
        extra = state.pop("_extra_state")
        return {**{k: v.clone() for k, v in state.items()}, **{f"extra.{k}": torch.as_tensor(v).clone() for k, v in extra.items()}}

    before = flat(fresh.state_dict())
    fresh.set_data(LABELS)
    fresh.build(*([x] for x in _features(seed=1)))
    assert all(torch.equal(before[k], v) for k, v in flat(fresh.state_dict()).items())


def test_bad_input():
    s, t = _features()
    unset = CRDTerm(feat_dim=DIM, nce_k=K)
    unset.build([s], [t])
    with pytest.raises(RuntimeError, match="before set_data"):
        unset([s], [t], torch.tensor([0, 1, 2]))
    term = _term()
    with pytest.raises(RuntimeError, match="sample index 12 is out of range.*12 samples"):
        term([s], [t], torch.tensor([0, 12, 2]))
    with pytest.raises(RuntimeError, match="sample index -1 is out of range"):
        term([s], [t], torch.tensor([0, -1, 2]))
    with pytest.raises(RuntimeError, match="batch size 3"):
        term([s], [t], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="loss.crd.layers"):
        CRDTerm().build([s, s], [t, t])
    with pytest.raises(ValueError, match="loss.crd.layers"):
        term([s, s], [t, t], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one class"):
        CRDTerm().set_data(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="1-d integer"):
        CRDTerm().set_data(torch.zeros(5))
    assert not term.z_set  # nothing was computed by the rejected calls


def _ddp_worker(rank, world, port):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # the global RNG differs by rank: the memories' initialisation must not
        term = CRDTerm(feat_dim=DIM, nce_k=K, nce_t=T, momentum=M)
        term.set_data(LABELS)
        torch.manual_seed(0)  # the same heads on both ranks (DDP broadcasts them; here the same seed)
        term.build(*([x] for x in _features()))
        s, t = _features(seed=40 + rank)
        index = torch.tensor([[0, 3, 5], [7, 9, 0]][rank])  # sample 0 on both ranks: rank 1's is the last
        mem_s = term.memory_s.clone()
        torch.manual_seed(rank)
        rows = sample_negatives(index, LABELS, K)
        e_s = torch.nn.functional.normalize(term.embed_s(s), dim=1).detach()
        local_z = normalization_constant(contrast_scores(term.memory_t, e_s, rows, T), len(LABELS))
        torch.manual_seed(rank)
        term([s], [t], index)
        for name, value in (("memory_s", term.memory_s), ("memory_t", term.memory_t), ("z", term.z)):
            gather = [torch.zeros_like(value) for _ in range(world)]
            torch.distributed.all_gather(gather, value)
            assert torch.equal(gather[0], gather[1]), name
        zs = [torch.zeros_like(local_z) for _ in range(world)]
        torch.distributed.all_gather(zs, local_z)
        torch.testing.assert_close(term.z[0], torch.stack(zs).mean())
        es = [torch.zeros_like(e_s) for _ in range(world)]
        torch.distributed.all_gather(es, e_s)
        # The global batch is [0, 3, 5, 7, 9, 0]: sample 0 takes rank 1's embedding (the last), not rank 0's.
        everything = torch.cat(es)[[1, 2, 3, 4, 5]].double().numpy()
        expected = _ref_update(mem_s.double().numpy(), [3, 5, 7, 9, 0], everything, M)
        np.testing.assert_allclose(term.memory_s.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_ranks_keep_identical_memories_and_the_mean_z():
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port), nprocs=2, join=True)


def test_a_non_finite_batch_leaves_the_memories_and_z_alone():
    """loss.on_nonfinite=skip drops such a batch after the term ran: it must not have poisoned CRD's state."""
    term = _term()
    s, t = _features(seed=40)
    before_s = term.memory_s.clone()
    bad = s.clone()
    bad[0] = float("nan")
    out = term([bad], [t], torch.tensor([0, 4, 8]))
    assert not torch.isfinite(out["crd"])
    assert not term.z_set  # Z waits for a finite batch
    assert torch.equal(term.memory_s[0], before_s[0])  # the student's NaN row: untouched
    assert not torch.equal(term.memory_s[4], before_s[4])  # its finite rows are updated
    assert torch.isfinite(term.memory_s).all() and torch.isfinite(term.memory_t).all()
    term([s], [t], torch.tensor([0, 4, 8]))
    assert term.z_set and torch.isfinite(term.z).all()
