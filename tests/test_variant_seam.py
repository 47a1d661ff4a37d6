"""The variant seam (layers/variant.py): the registry picks each adapter's variant, the variant lists its
parameters and file keys, and copies of a model keep the registered objects."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers.core import AdapterSpec
from lorakit.layers.dora import Dora
from lorakit.layers.variant import register, variant_of


def _model(**cfg) -> nn.Module:
    torch.manual_seed(0)
    return lk.inject(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3)), lk.LoraConfig(r=2, target_modules=["0"], **cfg))


def test_settings_select_the_variant():
    assert variant_of(AdapterSpec(r=2, alpha=4)).name == "lora"
    assert variant_of(AdapterSpec(r=2, alpha=4, use_dora=True)).name == "dora"


def test_a_name_registers_once():
    with pytest.raises(lk.LorakitError, match="already registered"):
        register(Dora())


def test_parameters_and_file_keys_come_from_the_variant(tmp_path):
    layer = _model(use_dora=True)[0]
    assert layer.lora_parameters("default") == [layer.lora_A["default"], layer.lora_B["default"],
                                                layer.lora_magnitude["default"]]
    extras = layer.lora_file_tensors("default")
    assert list(extras) == ["lora_magnitude_vector"] and extras["lora_magnitude_vector"] is layer.lora_magnitude["default"]
    written = lk.adapter_state_dict(_model(use_dora=True))
    assert {k.rsplit(".", 1)[-1] for k in written} == {"weight", *extras}
    plain = _model()[0]
    assert plain.lora_file_tensors("default") == {} and len(plain.lora_parameters("default")) == 2


def test_copies_keep_the_registered_variant():
    model = _model(use_dora=True)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other[0].lora_variants["default"] is model[0].lora_variants["default"]
        x = torch.randn(2, 6)
        torch.testing.assert_close(other(x), model(x))
