"""The adapters a server knows: registered by name and folder, at most `max_loaded` of them in the model
at once (loaded on first use, the least recently used idle one evicted), and how many requests use each.

Only the engine thread changes the model (load, evict); the HTTP side reads names and counts under a lock.
"""

from __future__ import annotations

import re
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from torch import nn

from .. import adapter_files
from ..adapters import delete_adapter, set_active, unload
from ..errors import LorakitError
from ..layers.adapter_bank import AdapterBank
from ..state import find_state, lora_layers

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


class AdapterInUse(LorakitError):
    """An adapter that queued or running requests still use."""


class AdapterRegistry:
    def __init__(self, model: nn.Module, base_name: str, max_loaded: int) -> None:
        if max_loaded < 1:
            raise LorakitError(f"--max-adapters must be at least 1, got {max_loaded}")
        self.model, self.base_name, self.max_loaded = model, base_name, max_loaded
        self.bank = AdapterBank(capacity=max_loaded)
        self.paths: dict[str, Path] = {}
        self.loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.in_use: Counter[str] = Counter()
        self.lock = threading.Lock()

    # ---- names (any thread) -------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        """Remember an adapter folder under `name`, checking only that it looks like one (it loads on use)."""
        path = Path(path).expanduser()
        if not NAME.fullmatch(name) or name == self.base_name:
            raise LorakitError(f"adapter name {name!r} is not usable: letters, digits and ._:/- only, and not "
                               f"the base model's name {self.base_name!r}")
        if not (path / adapter_files.CONFIG_NAME).is_file():
            raise LorakitError(f"adapter {name!r}: {path} has no {adapter_files.CONFIG_NAME}; give an adapter folder "
                               "written by lorakit or PEFT")
        with self.lock:
            if name in self.paths:
                raise LorakitError(f"adapter {name!r} is already registered (from {self.paths[name]}); "
                                   "unload it first or pick another name")
            self.paths[name] = path

    def known(self, name: str) -> bool:
        with self.lock:
            return name in self.paths

    def names(self) -> list[str]:
        with self.lock:
            return list(self.paths)

    def acquire(self, name: str | None) -> None:
        """Count a request on `name`; KeyError when it was unloaded meanwhile (so it cannot vanish in use)."""
        if name is not None:
            with self.lock:
                if name not in self.paths:
                    raise KeyError(name)
                self.in_use[name] += 1

    def release(self, name: str | None) -> None:
        if name is not None:
            with self.lock:
                self.in_use[name] -= 1
                if self.in_use[name] <= 0:
                    del self.in_use[name]

    # ---- the model (engine thread only) ------------------------------------------------------------
    def is_loaded(self, name: str | None) -> bool:
        return name is None or name in self.loaded

    def ensure_loaded(self, name: str | None) -> bool:
        """Make `name` usable by the next forward; False when every loaded slot is busy (try again later)."""
        if name is None:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return True
        if len(self.loaded) >= self.max_loaded and not self._evict_one():
            return False
        self._load(name)
        return True

    def load_now(self, name: str, path: str | Path) -> None:
        """POST /v1/load_lora_adapter: register and load at once, so a bad folder is refused immediately."""
        self.register(name, path)
        try:
            if len(self.loaded) >= self.max_loaded:
                self._evict_one()
            self._load(name)
            while len(self.loaded) > self.max_loaded and self._evict_one():
                pass
        except Exception:
            with self.lock:
                del self.paths[name]
            raise

    def unregister(self, name: str) -> None:
        """POST /v1/unload_lora_adapter: refused while requests use it (AdapterInUse), else forgotten."""
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            if self.in_use.get(name):
                raise AdapterInUse(f"adapter {name!r} is used by {self.in_use[name]} queued or running request(s); "
                                   "unload it once they finish")
            del self.paths[name]
        if name in self.loaded:
            self._drop(name)

    def _load(self, name: str) -> None:
        path = self.paths[name]
        config = adapter_files.read_adapter(path).config
        if config.get("modules_to_save") or (config.get("bias") or "none") != "none":
            what = "modules_to_save" if config.get("modules_to_save") else f"bias={config.get('bias')!r}"
            raise LorakitError(f"adapter {name!r} ({path}) has {what}: whole modules or biases replace base weights "
                               "shared by every request, so it cannot be served per request; merge it "
                               "(lorakit merge) and serve the merged model")
        adapter_files.load(self.model, path, adapter=name)
        set_active(self.model, None)
        self.bank.add((layer for _, layer in lora_layers(self.model)), name)
        self.loaded[name] = None

    def _evict_one(self) -> bool:
        with self.lock:
            idle = next((n for n in self.loaded if not self.in_use.get(n)), None)
        if idle is None:
            return False
        self._drop(idle)
        return True

    def _drop(self, name: str) -> None:
        self.bank.remove(name)
        del self.loaded[name]
        state = find_state(self.model)
        if state is not None and list(state.configs) == [name]:
            unload(self.model, merge=False)
        else:
            delete_adapter(self.model, name)
