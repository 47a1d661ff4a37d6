"""bench/harness.py: each configuration runs in its own process and must see the options the script was given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

SCRIPT = '''
import json, sys
sys.path.insert(0, {bench!r})
from harness import main


def add_arguments(parser):
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--names", nargs="*", default=None)


def run_config(name, args):
    return {{"threads": args.threads, "flag": args.flag, "names": args.names}}


def report(results):
    print("RESULTS " + json.dumps(results))


main(["one", "two"], run_config, report, add_arguments)
'''


def _results(tmp_path: Path, *argv: str) -> dict:
    script = tmp_path / "bench_probe.py"
    script.write_text(SCRIPT.format(bench=str(BENCH)))
    proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, check=True, timeout=300)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    return {name: {k: v for k, v in r.items() if k != "peak_rss_mb"} for name, r in results.items()}


def test_children_see_the_scripts_own_options(tmp_path):
    results = _results(tmp_path, "--only", "two", "--threads", "2", "--flag", "--names", "a", "b")
    assert list(results) == ["two"]
    assert results["two"] == {"threads": 2, "flag": True, "names": ["a", "b"]}


def test_children_keep_defaults_when_no_option_is_given(tmp_path):
    results = _results(tmp_path)
    assert results["one"] == results["two"] == {"threads": 1, "flag": False, "names": None}
