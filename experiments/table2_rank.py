"""Table 2 of docs/experiments.md, the rank: LoRA on q,v with r = 1, 2, 4, 8, 16, 32, 64 (alpha fixed at 16),
all at the learning rate LoRA r=8 q,v's sweep picked, 3 seeds each (the LoRA paper's Table 6).

    python experiments/table2_rank.py             # resumable: finished (configuration, seed) runs are skipped
"""

from __future__ import annotations

import study


def main(argv: list[str] | None = None) -> None:
    args = study.parser(__doc__).parse_args(argv)
    s = study.study_from(args)
    study.run_table(s, study.selected(study.RANK_SWEEP, args.only))


if __name__ == "__main__":
    main()
