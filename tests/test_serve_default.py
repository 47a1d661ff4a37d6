"""`lorakit serve` on the embedded default with the demo's sentiment adapter: served answers to held-out
prompts, batched with base-model requests, are the tokens lorakit eval picks and model.generate produces."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import pytest
import torch
from serve_fixtures import LiveServer

DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "runs" / "train" / "adapter"  # what `make demo` writes


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """The demo's adapter when `make demo` ran, else a short training run of the same job (12 steps)."""
    if (DEMO_ADAPTER / "adapter_config.json").is_file():
        return DEMO_ADAPTER
    from lorakit.train.job import JobConfig, run_job

    out = tmp_path_factory.mktemp("demo") / "run"
    run_job(JobConfig.of(steps=12, lr=2e-3, batch_size=8, eval_size=16, out=str(out)), progress=False)
    return out / "adapter"


@pytest.mark.slow
def test_sentiment_adapter_served_as_eval_answers(adapter, tmp_path):
    from lorakit.train.evaluate import choice_predictions
    from lorakit.train.job import JobConfig, prepare

    model, tokenizer, prepared = prepare(JobConfig.of(eval_size=8), torch.device("cpu"), adapter=str(adapter))
    task = prepared.choice
    rows = list(range(len(task.prompts)))
    predicted = choice_predictions(model.eval(), task, rows).tolist()
    with torch.no_grad():
        reference = [int(model.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False,
                                        pad_token_id=tokenizer.eos_token_id)[0, -1]) for p in task.prompts]
    live = LiveServer(["--adapter", f"sentiment={adapter}"], tmp_path / "server.log", start_timeout=180)
    try:
        client = live.client()
        jobs = [(m, p) for p in task.prompts for m in ("sentiment", "SmolLM2-135M-Instruct")]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: client.completions.create(
                model=job[0], prompt=job[1], max_tokens=1, temperature=0), jobs))
    finally:
        assert live.stop(60) == 0
    served = [a for (m, _), a in zip(jobs, answers) if m == "sentiment"]
    for row, answer, want in zip(rows, served, reference):
        assert answer.choices[0].text == tokenizer.decode([want], skip_special_tokens=True), row
        if want in task.candidate_ids:  # the eval's choice among the answers
            assert task.candidate_ids.index(want) == predicted[row]
    assert sum(want in task.candidate_ids for want in reference) >= len(rows) // 2
