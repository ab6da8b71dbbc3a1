"""Option scoring with shared prompts against one row per option, on Social IQa with SmolLM2-135M.

Social IQa's answers are several tokens long, so each example needs the log-likelihood of three
continuations of the same prompt. ``share_prompts=True`` runs the prompt once and continues every option
from its key/value cache; ``share_prompts=False`` (the reference) runs prompt + option for each option.
Same examples, same batch size, interleaved; the scores must agree.

    python -m moelora.bench.eval_bench [--quick]
"""

from __future__ import annotations

import argparse
import json

from .timing import time_interleaved


def run(quick: bool = False, examples: int = 64, batch_size: int = 32) -> dict:
    from moelora.finetune.base_models import load_model_and_tokenizer
    from moelora.finetune.eval import score_options
    from moelora.finetune.run_config import load_config
    from moelora.finetune.tasks import TaskRuntime

    config = load_config(None, ["data.task=siqa", 'data.options={"answer_format": "text"}', "data.max_length=192",
                                f"data.max_eval={examples}"])
    runtime = TaskRuntime.load(config)
    model, tokenizer = load_model_and_tokenizer(config.model.name)
    model.eval()
    subset = list(runtime.task.test[:examples])
    results: dict[bool, list[list[float]]] = {}

    def scorer(share: bool):
        def score() -> None:
            results[share] = score_options(model, tokenizer, subset, batch_size=batch_size,
                                           max_length=config.data.max_length, share_prompts=share)
        return score

    timing = time_interleaved({"shared_prompts": scorer(True), "row_per_option": scorer(False)},
                              repeats=2 if quick else 5, warmup=1)
    differences = [abs(a - b) for x, y in zip(results[True], results[False]) for a, b in zip(x, y)]
    same = sum(max(range(len(x)), key=x.__getitem__) == max(range(len(y)), key=y.__getitem__)
               for x, y in zip(results[True], results[False]))
    return {"examples": len(subset), "options": sum(len(x) for x in results[True]), "batch_size": batch_size,
            "timings": timing.as_dict(), "speedup": timing.ratio("row_per_option", "shared_prompts"),
            "max_abs_score_difference": max(differences), "same_prediction": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
