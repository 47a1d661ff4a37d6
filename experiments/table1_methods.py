"""Table 1 of docs/experiments.md, the methods: zero-shot, full fine-tuning, LoRA on q,v and on every linear
layer, DoRA, PiSSA, QLoRA and rsLoRA, each at the learning rate its own sweep picked, 3 seeds each.

    python experiments/table1_methods.py          # resumable: finished (configuration, seed) runs are skipped
"""

from __future__ import annotations

import study
from table4_memory import TABLE1_SEQ_LEN, estimates


def zero_shot(s: study.Study) -> dict:
    """The untrained model on the held-out rows (deterministic: one run)."""
    data = {"data": s.data} | ({"eval_data": s.eval_data} if s.eval_data else {})
    spec = {"kind": "zero-shot", "study": s.describe(), "config": "zero-shot",
            "job": {"model": s.model, **data, "precision": s.precision}}
    print("zero-shot", flush=True)
    return study.run_child(spec, s.results / "zero-shot" / "result.json")


def main(argv: list[str] | None = None) -> None:
    args = study.parser(__doc__).parse_args(argv)
    s = study.study_from(args)
    configs = study.selected(study.METHODS, args.only)
    zero_shot(s)
    estimates(s, [(c, TABLE1_SEQ_LEN) for c in configs])
    study.run_table(s, configs)


if __name__ == "__main__":
    main()
