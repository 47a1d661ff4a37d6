"""transformers Trainer and TRL's SFTTrainer with LorakitCallback: every checkpoint and the final output hold a
PEFT-layout adapter that PEFT and lorakit load to the trained model; resuming still works."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit as lk
from tiny_models import _llama

peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")
from transformers import Trainer, TrainingArguments  # noqa: E402

from lorakit.integrations import LorakitCallback  # noqa: E402


def _data():
    ids = torch.randint(1, 96, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def _tokenizer():
    """A word-level tokenizer over the tiny model's 96 ids (SFTTrainer wants one for padding)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, 95)}, "<eos>": 95}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="<eos>")


def _args(out, max_steps=4):
    return TrainingArguments(str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], learning_rate=1e-2, disable_tqdm=True, bf16=False)  # no autocast wrapper


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def _check_folder(folder, base, trained):
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    want = _logits(trained, ids)
    torch.testing.assert_close(_logits(lk.load(copy.deepcopy(base), folder), ids), want, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    torch.testing.assert_close(_logits(theirs, ids), want, atol=1e-5, rtol=0)


def test_trainer_checkpoints_hold_adapters_and_resume(tmp_path):
    torch.manual_seed(0)
    base = _llama().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[LorakitCallback()])
    trainer.train()
    for folder in (tmp_path, tmp_path / "checkpoint-4"):
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        _check_folder(folder, base, model)
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    # resume from the middle: the same end state as the uninterrupted run
    again = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    resumed = Trainer(model=again, args=_args(tmp_path / "resumed"), train_dataset=_data(),
                      callbacks=[LorakitCallback()])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    _check_folder(tmp_path / "resumed", base, model)


def test_checkpoint_without_adapter_names_the_callback(tmp_path):
    torch.manual_seed(0)
    model = lk.inject(_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=_data()).train()
    with pytest.raises(lk.FormatError, match="LorakitCallback"):
        lk.load(_llama(), tmp_path / "checkpoint-2")


def test_sft_trainer_checkpoint_loads_in_peft_and_lorakit(tmp_path):
    trl = pytest.importorskip("trl")
    torch.manual_seed(0)
    base = _llama().eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], alpha=4))
    args = trl.SFTConfig(str(tmp_path), max_steps=2, save_steps=2, per_device_train_batch_size=4, use_cpu=True,
                         report_to=[], learning_rate=1e-2, disable_tqdm=True, bf16=False)  # no autocast wrapper
    data = datasets.Dataset.from_dict({"input_ids": _data()["input_ids"]})  # already tokenized
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                             callbacks=[LorakitCallback()])
    trainer.train()
    _check_folder(tmp_path / "checkpoint-2", base, model)
    _check_folder(tmp_path, base, model)
