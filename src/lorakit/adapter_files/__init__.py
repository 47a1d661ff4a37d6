"""Adapter files: writing PEFT folders, parsing them, binding them to a model, importing loralib checkpoints.

The config keys lorakit knows (read, harmless, accepted only at their no-op value) are listed in config_keys.
"""

from .bind import load
from .layout import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from .loralib_import import load_loralib
from .parse import AdapterFile, read_adapter
from .write import adapter_config, adapter_state_dict, save

__all__ = ["save", "load", "load_loralib", "adapter_state_dict", "adapter_config", "read_adapter", "AdapterFile",
           "CONFIG_NAME", "WEIGHTS_NAME", "PREFIX"]
