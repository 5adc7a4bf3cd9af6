"""The offline comparison of runs: table, Pareto marks (checked by brute force) and plots."""

from __future__ import annotations

import json
import random

import pytest

from distill.report.comparison import compare, pareto_front, write_comparison


def _brute_force_front(points):
    """Point i is optimal unless some j is at least as accurate and at most as costly, and differs."""
    front = []
    for i, p in enumerate(points):
        if p is None:
            front.append(False)
            continue
        beaten = False
        for j, q in enumerate(points):
            if j != i and q is not None and q != p and q[0] >= p[0] and q[1] <= p[1]:
                beaten = True
        front.append(not beaten)
    return front


@pytest.mark.parametrize("seed", range(30))
def test_pareto_front_matches_brute_force(seed):
    rng = random.Random(seed)
    # Small integer grids make ties (equal accuracy or equal cost) common.
    points = [None if rng.random() < 0.1 else (rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 25))]
    assert pareto_front(points) == _brute_force_front(points)


def _summary(acc, size, latency, bits=8, sparsity=None):
    student = {"arch": "mlp", "bits": bits, "test_acc": acc + 0.01, "acc_fp32": 0.97, "acc_quant": acc,
               "size_bytes": 200_000, "size_bytes_fp32": 200_000, "size_bytes_quant": size,
               "latency_ms_quant_batch": latency, "latency_ms_quant": latency / 10, "latency_ms_fp32_batch": 1.0,
               "latency_batch_size": 1024, "latency_threads": 2}
    if sparsity is not None:
        student["sparsity"] = sparsity
    return {"student": student, "teacher": {"arch": "resnet50", "test_acc": 0.98, "size_bytes": 94_000_000, "latency_ms_batch": 900.0}}


def test_comparison_table_marks_and_plots(tmp_path):
    points = [(0.97, 52_000, 0.9), (0.96, 30_000, 0.8), (0.95, 30_000, 0.7), (0.90, 20_000, 1.2), (0.97, 60_000, 0.95)]
    for num, (acc, size, lat) in enumerate(points):
        run = tmp_path / str(num)
        run.mkdir()
        (run / "summary.json").write_text(json.dumps(_summary(acc, size, lat, sparsity=0.5)))
    (tmp_path / "5" / ".hydra").mkdir(parents=True)  # started, never finished
    (tmp_path / "5" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "6").mkdir()
    (tmp_path / "6" / "summary.json").write_text("{not json")

    rows = {r["run"]: r for r in compare([tmp_path])}
    assert rows["5"]["status"] == "unfinished" and rows["6"]["status"] == "corrupt summary"
    ok = [rows[str(n)] for n in range(5)]
    assert [r["pareto_size"] for r in ok] == _brute_force_front([(a, s) for a, s, _ in points]) == [True, True, False, True, False]
    assert [r["pareto_latency"] for r in ok] == _brute_force_front([(a, lat) for a, _, lat in points])

    written = write_comparison(list(rows.values()), tmp_path)
    markdown = written["markdown"].read_text()
    assert "unfinished" in markdown and "corrupt summary" in markdown and "★" in markdown
    import matplotlib.pyplot as plt

    for kind in ("plot_size", "plot_latency"):
        image = plt.imread(written[kind])
        assert image.shape[0] > 300 and image.shape[1] > 500  # a real, rendered figure


def test_comparison_pushed_to_wandb_offline(tmp_path, make_cfg, monkeypatch):
    from distill.evaluation import compare_runs

    runs = tmp_path / "sweep"
    for num, acc in enumerate((0.97, 0.95)):
        (runs / str(num)).mkdir(parents=True)
        (runs / str(num) / "summary.json").write_text(json.dumps(_summary(acc, 50_000 - num * 10_000, 1.0)))
    monkeypatch.setenv("WANDB_MODE", "offline")
    result = compare_runs(make_cfg(f"runs={runs}", "wandb.project=distill", config_name="evaluate"))
    assert result["wandb_run"].startswith("offline run")
    [table] = (runs / "wandb").glob("offline-run-*/files/media/table/comparison_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 2
    assert list((runs / "wandb").glob("offline-run-*/files/media/images/plot_size_*.png"))


def _seeded_runs(root, table):
    """Run directories as a sweep writes them: summary.json with the seed, and Hydra's overrides."""
    for num, (loss, seed, acc, size) in enumerate(table):
        run = root / str(num)
        (run / ".hydra").mkdir(parents=True)
        summary = _summary(acc, size, 1.0 + num / 100)
        summary["hparams"] = {"loss": loss, "seed": seed, "alpha": 0.9}
        (run / "summary.json").write_text(json.dumps(summary))
        (run / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n")


def test_runs_differing_only_in_seed_are_grouped_with_mean_std_and_n(tmp_path):
    import statistics

    from distill.report.seeds import group_by_seed

    accs = {"kd": [0.95, 0.96, 0.97], "dkd": [0.96, 0.98, 0.97, 0.99]}
    table = [(loss, seed, acc, 30_000 if loss == "kd" else 40_000) for loss, values in accs.items() for seed, acc in enumerate(values)]
    _seeded_runs(tmp_path, table)
    rows = compare([tmp_path])
    assert {r["method"] for r in rows} == {"kd", "dkd"} and sorted(r["seed"] for r in rows) == [0, 0, 1, 1, 2, 2, 3]
    groups = {g.method: g for g in group_by_seed(rows)}
    for loss, values in accs.items():
        g = groups[loss]
        assert g.n == len(values) and sorted(g.seeds) == list(range(len(values)))
        assert g.acc_mean == pytest.approx(statistics.fmean(values)) and g.acc_std == pytest.approx(statistics.stdev(values))
    # the frontier is on the means: dkd is more accurate but larger, kd smaller: both on it
    assert groups["kd"].pareto_size and groups["dkd"].pareto_size
    written = write_comparison(rows, tmp_path)
    markdown = written["seeds_markdown"].read_text()
    assert "97.50 ± 1.29" in markdown and "96.00 ± 1.00" in markdown  # dkd, kd in percent, with n beside them
    assert "| n |" in markdown.splitlines()[0]
    header = written["seeds_csv"].read_text().splitlines()[0].split(",")
    assert {"n", "acc_mean", "acc_std", "size_bytes", "pareto_size"} <= set(header) and "seed" not in header
    import matplotlib.pyplot as plt

    assert plt.imread(written["plot_seeds_size"]).shape[0] > 300


def test_single_seed_sweeps_write_no_seed_table(tmp_path):
    _seeded_runs(tmp_path, [("kd", 0, 0.95, 30_000), ("dkd", 0, 0.96, 40_000)])
    assert "seeds_markdown" not in write_comparison(compare([tmp_path]), tmp_path)


def test_runs_without_a_recorded_seed_are_not_taken_for_seeds(tmp_path):
    """Two alike runs of an older version (no seed in the summary) may differ in anything: not grouped."""
    from distill.report.seeds import group_by_seed

    for num in range(2):
        (tmp_path / str(num)).mkdir()
        (tmp_path / str(num) / "summary.json").write_text(json.dumps(_summary(0.95 + num / 100, 30_000, 1.0)))
    assert [g.n for g in group_by_seed(compare([tmp_path]))] == [1, 1]


def test_seed_groups_keep_apart_runs_whose_settings_differ_and_count_a_seed_once(tmp_path):
    from distill.report.seeds import group_by_seed

    table = [("kd", seed, 0.95 + seed / 100, 30_000) for seed in range(3)]
    _seeded_runs(tmp_path / "a", table)
    # the same overrides, but a temperature set elsewhere (an experiment file): another setting
    summary = json.loads((tmp_path / "a" / "2" / "summary.json").read_text())
    summary["hparams"]["temperature"] = 1.0
    (tmp_path / "a" / "2" / "summary.json").write_text(json.dumps(summary))
    groups = sorted(group_by_seed(compare([tmp_path / "a"])), key=lambda g: g.n)
    assert [g.n for g in groups] == [1, 2]
    # one run reached twice (two runs= roots): its seed counts once
    rows = compare([tmp_path / "a"]) + compare([tmp_path / "a" / "0"])
    assert sorted(g.n for g in group_by_seed(rows)) == [1, 2]


def test_each_deployable_file_is_a_row_of_its_own_on_the_front(tmp_path):
    summary = _summary(0.95, 50_000, 2.0)
    summary["artifacts"] = [
        {"format": "pytorch", "path": None, "runtime": "pytorch (eager)", "acc": 0.96, "error": None},
        {"format": "pytorch_int8", "path": None, "runtime": "pytorch (x86)", "acc": 0.95, "error": None},
        {"format": "onnx", "path": "r/student.onnx", "runtime": "onnxruntime (CPUExecutionProvider)", "acc": 0.96,
         "size_bytes": 200_000, "latency_ms": 0.03, "latency_ms_batch": 1.5, "flagged": False, "error": None},
        {"format": "onnx_int8", "path": "r/student_int8.onnx", "runtime": "onnxruntime (CPUExecutionProvider)", "acc": 0.95,
         "size_bytes": 60_000, "latency_ms": 0.02, "latency_ms_batch": 0.5, "flagged": True, "error": None, "bits": 4},
        {"format": "onnx_fp16", "path": "r/student_fp16.onnx", "runtime": "onnxruntime (CPUExecutionProvider)", "acc": 0.99,
         "size_bytes": 1_000, "latency_ms": 0.01, "latency_ms_batch": 0.1, "error": None, "test_samples": 10, "whole_split": False},
        {"format": "torch_export", "path": None, "runtime": "torch.export", "error": "RuntimeError: cannot trace"},
    ]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    rows = compare([tmp_path])
    by_file = {r.get("file"): r for r in rows}
    assert list(by_file) == [None, "onnx", "onnx_int8", "onnx_fp16", "torch_export"]  # the references are the run's own row
    run, onnx_int8 = by_file[None], by_file["onnx_int8"]
    assert (onnx_int8["acc"], onnx_int8["size_bytes"], onnx_int8["latency_ms_batch"], onnx_int8["bits"]) == (0.95, 60_000, 0.5, 4)
    # measured on 10 test samples only: listed, never set against whole-split accuracies
    assert by_file["onnx_fp16"]["status"] == "ok (first 10 test samples)" and not by_file["onnx_fp16"].get("pareto_latency")
    assert onnx_int8["deployed"].endswith("(!)") and onnx_int8["student"] == run["student"] == "mlp"
    # the int8 file is as accurate as the run's integer model and faster: it, not the model, is on the latency front
    assert onnx_int8["pareto_latency"] and not run["pareto_latency"] and by_file["onnx"]["pareto_latency"]
    assert by_file["torch_export"]["status"].startswith("failed: RuntimeError: cannot trace")
    written = write_comparison(rows, tmp_path / "out")
    assert "onnx_int8" in written["markdown"].read_text() and written["plot_latency"].exists()
