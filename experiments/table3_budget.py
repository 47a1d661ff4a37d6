"""Table 3 of docs/experiments.md, which weights for one budget: q at r=8, v at r=8, q,v at r=4 and q,k,v,o
at r=2, at LoRA r=8 q,v's learning rate, 3 seeds each (the LoRA paper's Table 5).

    python experiments/table3_budget.py           # resumable: finished (configuration, seed) runs are skipped
"""

from __future__ import annotations

import study


def main(argv: list[str] | None = None) -> None:
    args = study.parser(__doc__).parse_args(argv)
    s = study.study_from(args)
    study.run_table(s, study.selected(study.BUDGET, args.only))


if __name__ == "__main__":
    main()
