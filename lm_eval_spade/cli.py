"""`lm-eval-spade`: the command line over the library.

Evaluation itself goes through lm-eval's own command (`lm_eval --model spade-exit ...`);
this command holds the jobs around it.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lm_eval_spade import __version__


def _demo(args: argparse.Namespace) -> None:
    from lm_eval_spade import demo

    results = demo.run(Path(args.out), args.exit_layers)
    print(demo.summary(results))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm-eval-spade",
        description=(
            "Early-exit evaluation with SPADE for lm-evaluation-harness. Evaluate with "
            "lm-eval's own command: `lm_eval --model spade-exit --model_args "
            "pretrained=MODEL,exit_layer=K[,decoder=spade|spade_nos|logit_lens]"
            "[,spade_positions=original|compact] --tasks ...`. Without exit settings "
            "spade-exit returns exactly what `--model hf` returns."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="build a tiny model and task locally and run lm_eval on them (no hub needed)",
        description=(
            "Builds a seeded random 6-block Llama with a word-level tokenizer and a "
            "one-token-answer multiple-choice task under --out, then runs the real "
            "`lm_eval` command for `hf` and for spade-exit at each --exit-layers value, "
            "and prints accuracy and compute fraction. Random weights: accuracy is chance."
        ),
    )
    demo.add_argument("--out", default="runs/demo", help="working directory (default: %(default)s)")
    demo.add_argument(
        "--exit-layers", type=int, nargs="+", default=[2, 4, 6], metavar="K",
        help="exit layers to run spade-exit at (default: %(default)s)",
    )  # fmt: skip
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.run(args)


if __name__ == "__main__":
    main()
