#!/usr/bin/env python3
"""Write `models/tessera-demo/reference.json`: what transformers says the demo model generates.

Run by hand after `train.py` (it takes a few seconds):

    /opt/refenv/bin/python tools/train_demo_model/reference.py

The file has the same format as the test fixtures' `reference.json` (see tests/fixtures/README.md)
and is computed by the same code: this script imports `compute_case` and friends from
`tests/fixtures/gen_fixtures.py`.  The model is reloaded from disk with
`AutoModelForCausalLM.from_pretrained` (float32 compute over the stored bf16 weights, eager
attention and experts).

Unlike the random fixtures, a trained model is not re-rolled until every greedy step is far from a
tie: the prompts are fixed, and whatever margins they have are recorded.  Two fields beyond the
fixture format say how close the calls were, so that tests can compare only where a tiny float
difference cannot change the outcome:

- per case `min_router_gap`: the smallest gap between the 2nd and 3rd expert's routing
  probability over every token and layer of the teacher-forced pass;
- top-level `stop_token_ids`: generation_config.json's eos list, used for `greedy_until_eos`
  (`eos_token_id` is config.json's single id, as in the fixtures).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests" / "fixtures"))

import gen_fixtures as fx  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

MODEL_DIR = REPO_ROOT / "models" / "tessera-demo"
NUM_NEW_TOKENS = 32
PROMPTS = [
    "The cat sat on the mat.",
    "A fool and his money",
    "Q: What is the meaning of life?",
    "<|im_start|>user\nTell me a fortune about Linux.<|im_end|>\n<|im_start|>assistant\n",
]


def main() -> None:
    if transformers.__version__ != fx.TRANSFORMERS_VERSION:
        sys.exit(f"transformers {fx.TRANSFORMERS_VERSION} required, found {transformers.__version__}")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    model_dir = parser.parse_args().model_dir
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    stored_dtype = json.loads((model_dir / "config.json").read_text())["dtype"]
    model = fx.load_model(model_dir)  # fails on missing/unexpected keys
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stop_ids = model.generation_config.eos_token_id
    stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]

    cases = []
    for text in PROMPTS:
        prompt_ids = tokenizer(text)["input_ids"]
        if tokenizer.decode(prompt_ids) != text:
            raise RuntimeError(f"{text!r} does not round-trip through the tokenizer")
        case, router_gap = fx.compute_case(model, prompt_ids, NUM_NEW_TOKENS)
        g = case["greedy_ids"]
        first_stop = min((g.index(s) for s in stop_ids if s in g), default=None)
        expected = g if first_stop is None else g[: first_stop + 1]
        if case["greedy_until_eos"] != expected:
            raise RuntimeError(f"eos stopping mismatch: {case['greedy_until_eos']} vs {expected}")
        cases.append(
            {
                "prompt_text": text,
                **case,
                "greedy_text": tokenizer.decode(g, skip_special_tokens=True),
                "min_router_gap": router_gap,
            }
        )
        margins = [t[0][1] - t[1][1] for t in case["top5"]]
        print(f"{text!r}: min margin {case['min_margin']:.4f} (step {margins.index(min(margins))}), "
              f"router gap {router_gap:.2e}\n  -> {tokenizer.decode(g)!r}")

    fx.write_json(
        model_dir / "reference.json",
        {
            "architecture": model.config.architectures[0],
            "transformers_version": transformers.__version__,
            "dtype": stored_dtype,
            "eos_token_id": model.config.eos_token_id,
            "stop_token_ids": stop_ids,
            "cases": cases,
        },
    )
    print(f"wrote {model_dir / 'reference.json'}")


if __name__ == "__main__":
    main()
