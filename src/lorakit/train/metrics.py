"""metrics.jsonl: one strict-JSON object per optimizer step, readable by any JSON parser.

JSON has no NaN or infinity; a non-finite value is written as null and its key listed under "nonfinite".
"""

from __future__ import annotations

import json
import math
from typing import Any

METRICS = "metrics.jsonl"


def strict_json(record: dict[str, Any]) -> str:
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        record = {k: (None if k in bad else v) for k, v in record.items()} | {"nonfinite": bad}
    return json.dumps(record, allow_nan=False)
