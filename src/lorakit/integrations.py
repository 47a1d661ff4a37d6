"""Hugging Face Trainer / TRL integration: one callback that keeps an adapter folder in every checkpoint.

    from lorakit.integrations import LorakitCallback
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[LorakitCallback()])

A lorakit model is the user's own model, so Trainer saves it whole (`model.safetensors`), which is what its
resume reads, but no LoRA tool can use that. The callback adds lorakit's PEFT-layout folder
(`adapter_config.json` + `adapter_model.safetensors`, other adapters in subfolders) to each
`checkpoint-<step>` and, when training ends, to `output_dir`: PeftModel.from_pretrained, vLLM and `lk.load`
read it, and resuming is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapter_files import save
from .errors import LorakitError
from .state import find_state


class LorakitCallback(TrainerCallback):
    """Writes the model's adapters (all of them, or `adapter`) beside every Trainer checkpoint and at the end.

    `dtype` casts the saved tensors (e.g. torch.bfloat16), as `lk.save` does.
    """

    def __init__(self, adapter: str | list[str] | None = None, dtype: torch.dtype | None = None) -> None:
        self.adapter = adapter
        self.dtype = dtype

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._write(model, Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", state)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._write(model, Path(args.output_dir), state)

    def _write(self, model: Any, folder: Path, state: Any) -> None:
        if not state.is_world_process_zero:
            return
        if model is None or find_state(model) is None:
            raise LorakitError("LorakitCallback: the Trainer's model has no lorakit adapters; call "
                               "lk.inject(model, cfg) before building the Trainer")
        save(model, folder, adapter=self.adapter, dtype=self.dtype)
