"""Serve a run's adapter farm on CPU: route each prompt, answer it with its own adapter, in mixed batches.

    python examples/route_and_generate.py --farm runs/demo/farm "reverse the words: box cup pen" \
        "how many words? arm bag dot" "Write a haiku about rain"

Each prompt goes to its nearest cluster centroid's adapter, or to the recommended merge when it is far
from every cluster (``tclora.farm``); one PEFT model holds every adapter and each batch row uses its own
(PEFT's ``generate(adapter_names=...)``). On GPUs, vLLM serves the same directories with multi-LoRA:
``cluster_configs/README.md``, "Serve the farm".
"""

from __future__ import annotations

import argparse

from tabulate import tabulate

from tclora.farm import Farm
from tclora.models import load_base


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--farm", required=True, help="the farm a run exported: <run.dir>/farm")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("prompts", nargs="+")
    args = parser.parse_args(argv)

    farm = Farm.load(args.farm)
    model, tokenizer = load_base(farm.base_model)  # "demo" is rebuilt from the cache like any checkpoint
    served = farm.generate(farm.peft_model(model), tokenizer, args.prompts, max_new_tokens=args.max_new_tokens)
    print(tabulate([[p[:50], name, f"{route.distance:.3f}", answer] for p, (route, name, answer)
                    in zip(args.prompts, served)], headers=["prompt", "adapter", "distance", "answer"]))
    return served


if __name__ == "__main__":
    main()
