"""What an adapter folder records about itself: the base model's public id, and lorakit's version where PEFT
does not complain about it."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from lorakit.errors import LorakitError
from tiny_models import _llama

peft = pytest.importorskip("peft")


def test_peft_loads_a_lorakit_folder_without_warnings(tmp_path):
    torch.manual_seed(0)
    base = _llama().eval()
    lk.save(lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    assert not any(k.startswith("lorakit") for k in json.loads((tmp_path / "adapter_config.json").read_text()))
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        assert handle.metadata()["lorakit_version"] == lk.__version__
        assert handle.metadata()["format"] == "pt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]


@pytest.mark.slow
def test_default_model_records_its_public_id(tmp_path):
    from lorakit.assets import default_model_path
    from lorakit.models import load_base_model

    try:
        default_model_path()
    except LorakitError as err:
        pytest.skip(str(err))
    model, _ = load_base_model("default")
    lk.save(lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"])), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
