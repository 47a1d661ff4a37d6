"""The study of docs/experiments.md (experiments/): the committed section is what the committed JSON generates,
every table's command runs end to end on a tiny model, and the verdicts follow their rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
sys.path.insert(0, str(EXPERIMENTS))

import make_docs  # noqa: E402
import run_one  # noqa: E402
import study  # noqa: E402
import table1_methods  # noqa: E402
import table2_rank  # noqa: E402
import table3_budget  # noqa: E402
import table4_memory  # noqa: E402
from test_data import write_jsonl  # noqa: E402
from test_train import ROWS, tiny_model  # noqa: E402, F401 - the fixture


def test_the_committed_section_is_what_the_committed_results_generate():
    assert make_docs.main(["--check"]) == 0


def test_every_table_runs_end_to_end_on_a_tiny_model(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """One configuration of each table, 2 steps; runs in this process instead of one process each (the same
    run_one code, minus the start-up of a Python per run)."""
    monkeypatch.setattr(study, "spawn", lambda spec, result: run_one.main(str(spec), str(result)))
    rows = [dict(r, prompt=r["prompt"].replace("Review:", f"Review {i}:")) for i, r in enumerate(ROWS["prompt_completion"])]
    held_out = [dict(r, prompt=r["prompt"].replace("Review:", "Held out:")) for r in ROWS["prompt_completion"][:8]]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "held-out.jsonl", held_out)
    common = ["--model", tiny_model, "--data", str(tmp_path / "train.jsonl"), "--eval-data",
              str(tmp_path / "held-out.jsonl"), "--steps", "2", "--batch-size", "4", "--seeds", "0", "--val-size",
              "8", "--precision", "fp32", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    table1_methods.main([*common, "--only", "lora-qv-r8"])
    table2_rank.main([*common, "--only", "lora-qv-r1"])
    table3_budget.main([*common, "--only", "lora-qkvo-r2"])
    table4_memory.main([*common, "--only", "lora-qv-r8"])
    results = tmp_path / "results"
    sweep = sorted(p.name for p in (results / "sweep" / "lora-qv-r8").iterdir())
    assert sweep == sorted(f"lr-{lr:g}.json" for lr in study.LR_GRIDS["adapter"])  # one sweep, reused
    validation = [json.loads(line) for line in (tmp_path / "runs" / "sweep-data" / "validation.jsonl").open()]
    swept = [json.loads(line) for line in (tmp_path / "runs" / "sweep-data" / "train.jsonl").open()]
    assert len(validation) == 8 and all(r in rows and r not in swept for r in validation)  # carved from training
    assert sorted(map(str, validation + swept)) == sorted(map(str, rows))
    for name in ("lora-qv-r8", "lora-qv-r1", "lora-qkvo-r2"):
        result = json.loads((results / name / "seed-0.json").read_text())
        assert result["steps"] == 2 and 0 <= result["after"]["accuracy"] <= 1 and result["checkpoint_bytes"] > 0
        assert result["spec"]["lr"] in study.LR_GRIDS["adapter"]
    for seq_len in table4_memory.SEQ_LENS:
        probe = json.loads((results / "memory" / f"lora-qv-r8-len{seq_len}" / "seed-0.json").read_text())
        assert probe["peak_rss_mb"] > 0 and probe["spec"]["job"]["max_length"] == seq_len
    estimates = sorted(p.name for p in (results / "estimates").iterdir())
    assert set(estimates) == {f"lora-qv-r8-len{n}.json" for n in table4_memory.SEQ_LENS}  # 64 shared by Table 1
    # A second call skips what is done; a result made with other settings is refused, not reused.
    done = results / "lora-qv-r1" / "seed-0.json"
    written = done.stat().st_mtime_ns
    table2_rank.main([*common, "--only", "lora-qv-r1"])
    assert done.stat().st_mtime_ns == written
    changed = list(common)
    changed[changed.index("--steps") + 1] = "3"
    with pytest.raises(SystemExit, match="other settings"):
        table2_rank.main([*changed, "--only", "lora-qv-r1"])
    doc = tmp_path / "experiments.md"
    doc.write_text("# Experiments\n\nkept by hand\n")
    assert make_docs.main(["--results", str(results), "--doc", str(doc), "--figures", str(tmp_path / "fig")]) == 0
    text = doc.read_text()
    assert text.startswith("# Experiments\n\nkept by hand\n") and make_docs.NOT_RUN in text
    assert (tmp_path / "fig" / "experiments_rank.png").stat().st_size > 1000
    assert make_docs.main(["--results", str(results), "--doc", str(doc), "--check"]) == 0


@pytest.mark.parametrize("a, b, kind, verdict", [
    ([0.90, 0.91, 0.92], [0.80, 0.81, 0.82], "beats", "holds"),
    ([0.90, 0.91, 0.92], [0.905, 0.91, 0.915], "beats", "within noise"),
    ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92], "beats", "does not hold"),
    ([0.90, 0.91, 0.92], [0.90, 0.91, 0.92], "matches", "holds"),
    ([0.90, 0.91, 0.92], [0.905, 0.915, 0.925], "matches", "holds within noise"),
    ([0.80, 0.81, 0.82], [0.90, 0.91, 0.92], "matches", "does not hold"),
    ([0.9], [0.8, 0.81], "matches", "too few seeds yet"),
    ([], [0.8, 0.81], "matches", make_docs.NOT_RUN),
])
def test_verdicts_follow_the_spread(a, b, kind, verdict):
    assert make_docs.compare(a, b, kind)[0] == verdict


def test_memory_ratio_verdict():
    assert make_docs.ratio_verdict([3300.0, 3310.0], [1000.0, 1005.0], 3.0)[1] == "holds"
    assert make_docs.ratio_verdict([3000.0, 3300.0], [1000.0, 1005.0], 3.0)[1] == "within noise"
    assert make_docs.ratio_verdict([2000.0, 2010.0], [1000.0, 1005.0], 3.0)[1] == "does not hold"
    assert make_docs.ratio_verdict([], [1000.0], 3.0)[1] == make_docs.NOT_RUN


def test_the_wall_time_bound_is_judged_only_when_the_cpu_time_exceeds_it():
    over = make_docs.bound_lines(2 * 60 * 121, "2")[0]  # 242 CPU minutes on 2 cores: at least 121 minutes
    assert "at least 121 minutes" in over and "over the 2-hour bound" in over
    under = make_docs.bound_lines(2 * 60 * 100, "2")[0]  # more runs could still take it over: no verdict
    assert "at least 100 minutes" in under and "bound" not in under
    assert make_docs.bound_lines(1000.0, "?") == []
