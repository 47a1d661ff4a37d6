"""`lorakit serve` settings: flags over a --config file, adapters from both, and errors that name the key."""

from __future__ import annotations

import pytest

from lorakit.errors import LorakitError
from lorakit.serve.server import serve_options


def test_flags_override_the_file_and_adapters_merge(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("model: some/folder\nport: 9000\nmax-batch: 4\nadapter: {a: /x/a}\n")
    options = serve_options(config, {"port": 9100, "adapter": ["b=/x/b"]})
    assert (options.model, options.port, options.max_batch, options.host) == ("some/folder", 9100, 4, "127.0.0.1")
    assert options.adapter == {"a": "/x/a", "b": "/x/b"}
    assert options.base_name == "folder"


def test_unknown_keys_and_bad_adapters_are_named(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('max_batchh = 4\n')
    with pytest.raises(LorakitError, match="max_batchh"):
        serve_options(config, {})
    with pytest.raises(LorakitError, match="NAME=PATH"):
        serve_options(None, {"adapter": ["no-equals-sign"]})
    with pytest.raises(LorakitError, match="given twice"):
        serve_options(None, {"adapter": ["a=/x", "a=/y"]})


def test_engine_threads_leave_a_core_for_the_http_side(tmp_path):
    from lorakit.serve.server import engine_threads

    assert [engine_threads(None, {}, cores=n) for n in (1, 2, 16)] == [1, 1, 15]
    assert engine_threads(None, {"OMP_NUM_THREADS": "3"}, cores=2) == 3  # the user's setting wins
    assert engine_threads(None, {"OMP_NUM_THREADS": ""}, cores=4) == 3
    assert engine_threads(2, {"OMP_NUM_THREADS": "3"}, cores=2) == 2  # --threads wins over both
    with pytest.raises(LorakitError, match="--threads 0"):
        engine_threads(0)
    config = tmp_path / "serve.yaml"
    config.write_text("threads: 1\n")
    assert serve_options(config, {}).threads == 1
