"""The serving engine without HTTP: greedy tokens of each request equal model.generate with only its adapter
active, whatever shares the batch (mixed adapters, ranks, targets, rows joining and leaving); the adapter
bank against per-row grouping; LRU loading; sampling with seeds; stop strings."""

from __future__ import annotations

import random

import pytest
import torch
from serve_fixtures import ADAPTERS, reference_greedy, save_adapters, tiny_llama, tokenizer

from lorakit.serve.engine import Delta, Engine, Failed, Finished, Request
from lorakit.serve.registry import AdapterRegistry
from lorakit.serve.sampling import SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = tokenizer()
    base = tiny_llama(tok)
    folders = save_adapters(base, tmp_path_factory.mktemp("adapters"))
    return tok, base, folders


def make_engine(base, tok, folders, max_loaded=8, max_batch=16, prefill_tokens=2048):
    import copy

    model = copy.deepcopy(base)
    registry = AdapterRegistry(model, "tiny", max_loaded)
    for name, folder in folders.items():
        registry.register(name, folder)
    return Engine(model, tok, registry, max_batch=max_batch, prefill_tokens=prefill_tokens)


class Collector:
    def __init__(self):
        self.deltas, self.end = [], None

    def __call__(self, event):
        if isinstance(event, Delta):
            self.deltas.append(event)
        else:
            self.end = event

    @property
    def tokens(self):
        return [c.token for d in self.deltas for c in d.tokens]


def run(engine, requests, stagger=None, limit=500):
    """Step the engine by hand; `stagger` maps step number -> requests submitted before that step."""
    pending = dict(stagger or {})
    for r in requests:
        engine.submit(r)
    for step in range(limit):
        for r in pending.pop(step, []):
            engine.submit(r)
        if not engine.waiting and not engine.running and not pending:
            return
        engine.step()
    raise AssertionError("engine did not finish")


def test_greedy_equals_generate_in_mixed_batches(setup):
    tok, base, folders = setup
    rng = random.Random(0)
    names = [None, *ADAPTERS]
    cases = []
    for i in range(14):
        prompt = [tok.bos_token_id] + [rng.randrange(5, len(tok)) for _ in range(rng.randrange(2, 15))]
        cases.append((names[i % len(names)], prompt, rng.randrange(1, 12)))
    engine = make_engine(base, tok, folders, max_batch=5)
    requests = []
    for adapter, prompt, n in cases:
        c = Collector()
        requests.append((Request(prompt, adapter, SamplingParams(n, temperature=0.0), c), c))
    first, later = [r for r, _ in requests[:6]], [r for r, _ in requests[6:]]
    run(engine, first, stagger={3: later[:4], 7: later[4:]})
    for (adapter, prompt, n), (_, c) in zip(cases, requests):
        want = reference_greedy(base, folders.get(adapter), prompt, n, tok.eos_token_id)
        assert isinstance(c.end, Finished), (adapter, c.end)
        assert c.end.completion_tokens == len(want), (adapter, prompt)
        assert [t for t in want if t != tok.eos_token_id] == c.tokens, (adapter, prompt)
        assert c.end.reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    assert engine.batch is None and not engine.running  # every row's cache was freed


def test_bank_matches_grouped_routing(setup):
    """The bank's gathered terms equal lk.route's per-adapter grouping on the same mixed batch."""
    import copy

    import lorakit as lk
    from lorakit.serve.batch import routed

    tok, base, folders = setup
    engine = make_engine(base, tok, folders)
    for name in folders:
        engine.registry.ensure_loaded(name)
    model = engine.model
    ids = torch.randint(5, len(tok), (6, 9))
    rows = [None, "a8", "b4", "c16", "a8", None]
    with torch.no_grad():
        with routed(model, engine.registry.bank, rows):
            banked = model(ids).logits
        with lk.route(model, rows, strategy="group"):
            grouped = model(ids).logits
        plain = copy.deepcopy(base)(ids).logits
    torch.testing.assert_close(banked, grouped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(banked[0], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(banked[1], plain[1], atol=1e-3)


def test_lru_loads_on_use_and_evicts_idle(setup):
    tok, base, folders = setup
    engine = make_engine(base, tok, folders, max_loaded=1)
    outs = []
    for name in ["a8", "b4", "c16", "a8"]:
        c = Collector()
        run(engine, [Request([1, 7, 9], name, SamplingParams(3, temperature=0.0), c)])
        outs.append((name, c.tokens))
        assert list(engine.registry.loaded) == [name]
    for name, tokens in outs:
        assert tokens == [t for t in reference_greedy(base, folders[name], [1, 7, 9], 3, tok.eos_token_id)
                          if t != tok.eos_token_id]
    assert list(engine.registry.bank.slots) == ["a8"]


def test_seeded_sampling_is_reproducible_whatever_the_batch(setup):
    tok, base, folders = setup
    params = SamplingParams(8, temperature=0.9, top_p=0.9, seed=123)
    alone, mixed = Collector(), Collector()
    run(make_engine(base, tok, folders), [Request([1, 9, 12], "b4", params, alone)])
    others = [Request([1, 5 + i], n, SamplingParams(6, temperature=1.0), Collector())
              for i, n in enumerate([None, "a8", "c16"])]
    run(make_engine(base, tok, folders), [*others, Request([1, 9, 12], "b4", params, mixed)])
    assert alone.tokens == mixed.tokens and len(alone.tokens) > 0


def test_stop_strings_cut_the_text(setup):
    tok, base, folders = setup
    free = Collector()
    run(make_engine(base, tok, folders), [Request([1, 9, 12], None, SamplingParams(12, temperature=0.0), free)])
    text = "".join(d.text for d in free.deltas)
    assert len(text) > 3
    stop = text[2:4]
    cut = Collector()
    run(make_engine(base, tok, folders), [Request([1, 9, 12], None, SamplingParams(12, 0.0, stop=(stop,)), cut)])
    assert "".join(d.text for d in cut.deltas) == text[:text.find(stop)]
    assert cut.end.reason == "stop"


def test_corrupt_adapter_fails_only_its_request(setup, tmp_path):
    tok, base, folders = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    engine = make_engine(base, tok, folders)
    engine.registry.register("bad", bad)
    good, broken = Collector(), Collector()
    run(engine, [Request([1, 4], "bad", SamplingParams(3, 0.0), broken), Request([1, 4], "a8", SamplingParams(3, 0.0), good)])
    assert isinstance(broken.end, Failed) and broken.end.status == 400 and "bad" in broken.end.message
    assert isinstance(good.end, Finished)


def test_one_adapter_load_per_step(setup):
    """Running rows never wait for more than one adapter load: other new adapters wait for later steps."""
    tok, base, folders = setup
    engine = make_engine(base, tok, folders)
    collectors = [Collector() for _ in folders]
    for name, c in zip(folders, collectors):
        engine.submit(Request([1, 7], name, SamplingParams(20, temperature=0.0), c))
    for step in range(1, 4):
        engine.step()
        assert len(engine.registry.loaded) == step and len(engine.running) == step
    run(engine, [])
    assert all(isinstance(c.end, Finished) for c in collectors)


def test_nf4_base_with_adapters_matches_generate(setup, tmp_path):
    """--quantize nf4: the served greedy tokens are those of the quantized model with the adapter alone."""
    import copy

    import lorakit as lk
    from lorakit.models import save_hf_folder
    from lorakit.serve.server import ServeOptions, build_engine

    tok, base, folders = setup
    save_hf_folder(base, tok, tmp_path / "tiny")
    options = ServeOptions(model=str(tmp_path / "tiny"), quantize="nf4", adapter={"b4": str(folders["b4"])},
                           threads=1)
    threads_before = torch.get_num_threads()
    try:
        engine = build_engine(options, log=lambda _: None)
        assert torch.get_num_threads() == 1  # --threads reaches torch
    finally:
        torch.set_num_threads(threads_before)
    got = Collector()
    run(engine, [Request([1, 9, 12, 30], "b4", SamplingParams(8, temperature=0.0), got),
                 Request([1, 5], None, SamplingParams(8, temperature=0.0), Collector())])
    reference = copy.deepcopy(base)
    lk.quantize_model(reference, "nf4", compute_dtype=torch.float32)
    want = reference_greedy(reference, folders["b4"], [1, 9, 12, 30], 8, tok.eos_token_id)
    assert got.tokens == [t for t in want if t != tok.eos_token_id]


def test_prefill_runs_the_output_head_as_one_matrix_multiply(setup):
    """A frozen head fed a strided slice of the last positions becomes a batched multiply that reads the
    whole (vocab x hidden) weight once per row; prefill hands it a contiguous gather instead."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.serve.batch import RunningBatch

    tok, base, folders = setup
    engine = make_engine(base, tok, folders)
    assert engine.registry.ensure_loaded("b4")
    head = engine.model.get_output_embeddings()
    assert not head.weight.requires_grad  # frozen by lk.inject, as in every served model
    vocab = head.weight.shape[0]
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        RunningBatch.prefill(engine.model, engine.registry.bank, prompts, ["b4", None, "b4"])
    head_calls = [e for e in prof.events() if e.name in ("aten::mm", "aten::bmm")
                  and any(vocab in shape for shape in e.input_shapes if shape)]
    assert [e.name for e in head_calls] == ["aten::mm"]
    assert head_calls[0].input_shapes[0] == [len(prompts), head.weight.shape[1]]
