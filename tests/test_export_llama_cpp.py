"""GGUF exports compared byte for byte with llama.cpp's own converters, when a llama.cpp source tree is at hand.

Set LORAKIT_LLAMA_CPP to a llama.cpp source folder (a git checkout, or vendor/llama.cpp of llama-cpp-python's
source distribution): its convert_lora_to_gguf.py and convert_hf_to_gguf.py (with their own gguf-py) then
convert the same adapter folder and merged model, and every tensor must be identical. Skipped otherwise:
the converters are not a dependency.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.export import merged_to_gguf, to_gguf
from test_export_gguf import _tokenizer_gguf
from tiny_models import _llama, randomize_adapters

gguf = pytest.importorskip("gguf")
LLAMA_CPP = Path(os.environ.get("LORAKIT_LLAMA_CPP", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (LLAMA_CPP / "convert_lora_to_gguf.py").is_file(),
                                reason="set LORAKIT_LLAMA_CPP to a llama.cpp source folder to compare with its converters")
# convert_hf_to_gguf.py without a tokenizer: the tiny models have none, and only tensors are compared
NO_VOCAB = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
try:
    import conversion.llama as llama
except ImportError:
    import convert_hf_to_gguf as llama
llama.LlamaModel.set_vocab = lambda self: None
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {folder!r}, "--outfile", {out!r}, "--outtype", {outtype!r}]
convert_hf_to_gguf.main()
"""


def _run(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    done = subprocess.run([sys.executable, *args], cwd=LLAMA_CPP, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_tensors(ours: Path, theirs: Path) -> gguf.GGUFReader:
    mine, ref = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    a, b = {t.name: t for t in mine.tensors}, {t.name: t for t in ref.tensors}
    assert a.keys() == b.keys()
    for name, t in b.items():
        assert a[name].shape.tolist() == t.shape.tolist() and a[name].tensor_type == t.tensor_type, name
        assert np.array_equal(np.asarray(a[name].data), np.asarray(t.data)), name
    return mine, ref


@pytest.mark.parametrize("outtype,dtype", [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_adapter_gguf_equals_convert_lora_to_gguf(outtype, dtype, tmp_path):
    torch.manual_seed(0)
    base = _llama().eval()
    base.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"]
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    randomize_adapters(model)
    lk.save(model, tmp_path / "adapter")
    to_gguf(tmp_path / "adapter", tmp_path / "ours.gguf", base=base, dtype=dtype)
    _run(["convert_lora_to_gguf.py", "--base", str(tmp_path / "base"), "--outfile", str(tmp_path / "ref.gguf"),
          "--outtype", outtype, str(tmp_path / "adapter")])
    mine, ref = _assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "ref.gguf")
    for key in ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha"):
        assert mine.fields[key].contents() == ref.fields[key].contents(), key


@pytest.mark.parametrize("outtype,dtype", [("f32", torch.float32), ("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_merged_gguf_equals_convert_hf_to_gguf(outtype, dtype, tmp_path):
    torch.manual_seed(0)
    model = lk.inject(_llama().eval(), lk.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_adapters(model)
    merged = lk.unload(model, merge=True)
    merged.save_pretrained(tmp_path / "merged")
    merged_to_gguf(merged, tmp_path / "ours.gguf", _tokenizer_gguf(tmp_path / "tok.gguf"), dtype=dtype)
    _run(["-c", NO_VOCAB.format(root=str(LLAMA_CPP), folder=str(tmp_path / "merged"), out=str(tmp_path / "ref.gguf"),
                                outtype=outtype)])
    mine, ref = _assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "ref.gguf")
    for key, field in ref.fields.items():
        if key.startswith("llama."):
            assert mine.fields[key].contents() == field.contents(), key
