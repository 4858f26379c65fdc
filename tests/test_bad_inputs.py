"""Bad inputs and faults, as a careless or unlucky user meets them, through the commands.

Each row runs one command line and asserts its exit status, that no traceback was
printed, that the one error line names the problem (for the rows that only warn: that
the warning does), and that no file outside the row's output changed (the sandbox of
inputs, stories260K and the shipped calibration assets are compared before and after).

How each row runs (`cliutil`):
- `spade`: `lm_eval_spade.cli.main` in this process, the `lm-eval-spade` entry point;
- `lm_eval`: lm-eval's own parser and config, then the model built as `simple_evaluate`
  builds it, under the command's error handling (`lm_eval` itself first indexes every
  task folder, ~8 s, which these inputs cannot reach);
- `lm_eval+`: the same, then lm-eval's `evaluate` on two documents of the row's task
  (faults that only show while scoring);
- `spade!`, `lm_eval!`: the real executables in a subprocess, for a representative share
  of rows (marked slow).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import sandbox
from cliutil import (
    changes,
    command_env,
    run_command,
    run_interrupted,
    run_lm_eval_model,
    run_spade_cli,
    snapshot,
)
from lmutil import GENERATION_YAML, STORIES

from lm_eval_spade import calibration

pytestmark = pytest.mark.shared  # reads ../shared (tests/conftest.py)


@dataclass(frozen=True)
class Row:
    runner: str
    argv: str
    status: int
    words: str
    out: str | None = None  # the output path the command may write
    env: tuple[tuple[str, str | None], ...] = ()
    interrupt_at: str | None = None  # Ctrl-C once the output matches this (`!` runners)


TL = "train-lens --model {stories} --kind lspade --data prompts.jsonl --steps 1 --batch-size 2"
FT = "finetune --model {stories} --task arc_easy_spade --steps 1"
SW = "sweep layers --model {stories} --tasks spade_calibration --limit 2"
ST = "sweep thresholds --model {stories} --tasks spade_calibration --lens lens --thresholds 1"
SX = "sweep transfer --model {stories} --tasks spade_calibration --thresholds 1"
LM = "--model spade-exit --tasks spade_calibration --device cpu --model_args pretrained={stories}"
ADAPT = f"{LM},threshold=1,confidence_decoder=logit_lens"
ARC = f"{TL.replace('prompts.jsonl', 'arc_easy_spade')} --split test --limit 4"
CT = "choose-threshold --model {stories} --task spade_calibration --confidence-decoder logit_lens"
USAGE = 2  # argparse's status, and lm_eval's for input errors
ERR = 1  # lm-eval-spade's for input errors


def data_dir(name: str) -> tuple[tuple[str, str | None], ...]:
    return (("LM_EVAL_SPADE_DATA_DIR", name),)


ROWS: dict[str, Row] = {
    # --- outputs: never replace what is not ours, ours only with --overwrite -------------
    "train-lens into a folder not ours": Row("spade", f"{TL} --out notours", ERR, "did not write"),
    "train-lens into a folder not ours, --overwrite": Row(
        "spade", f"{TL} --out notours --overwrite", ERR, "did not write"
    ),
    "train-lens onto a file": Row("spade", f"{TL} --out afile.txt", ERR, "is an existing file"),
    "train-lens onto an earlier lens": Row("spade", f"{TL} --out lens", ERR, "add --overwrite"),
    "train-lens onto a sweep, --overwrite": Row(
        "spade", f"{TL} --out sweep_old --overwrite", ERR, "holds a sweep output, not a lens"
    ),
    "export-lens into a folder not ours": Row(
        "spade", "export-lens tuned notours", ERR, "did not write"
    ),
    "export-lens onto a file": Row("spade", "export-lens tuned afile.txt", ERR, "existing file"),
    "export-lens onto a lens, --overwrite": Row(
        "spade", "export-lens tuned lens --overwrite", ERR, "holds a lens output"
    ),
    "finetune into a folder not ours": Row("spade", f"{FT} --out notours", ERR, "did not write"),
    "finetune onto a file": Row("spade", f"{FT} --out afile.txt", ERR, "is an existing file"),
    "finetune onto an earlier adapter": Row(
        "spade", f"{FT} --out adapter_old", ERR, "add --overwrite"
    ),
    "sweep into a folder not ours": Row("spade", f"{SW} --out notours", ERR, "did not write"),
    "sweep onto an earlier sweep (would mix runs)": Row(
        "spade", f"{SW} --out sweep_old", ERR, "already holds a sweep.*add --overwrite"
    ),
    "sweep onto a lens, --overwrite": Row(
        "spade", f"{SW} --out lens --overwrite", ERR, "holds a lens output, not a sweep"
    ),
    "thresholds sweep onto a file": Row("spade", f"{ST} --out afile.txt", ERR, "existing file"),
    "report into a folder not ours": Row(
        "spade", "report results_dir --out notours", ERR, "did not write"
    ),
    "report onto an earlier report": Row("spade", "report results_dir", ERR, "add --overwrite"),
    "report onto a file": Row("spade", "report results_dir --out afile.txt", ERR, "existing file"),
    "calibrate into a folder not ours": Row(
        "spade", "calibrate --out notours --steps 1", ERR, "did not write"
    ),
    "demo into a folder not ours": Row("spade", "demo --out notours", ERR, "did not write"),
    "exit_log onto a user's file": Row(
        "lm_eval", f"{ADAPT},exit_log=afile.txt", USAGE, "exit_log=afile.txt is an existing file"
    ),
    "exit_log onto a folder": Row("lm_eval", f"{ADAPT},exit_log=notours", USAGE, "is a folder"),
    "choose-threshold into a folder not ours": Row(
        "spade", f"{CT} --out notours", ERR, "notours is a folder that lm-eval-spade did not"
    ),
    "choose-threshold onto a user's file": Row(
        "spade", f"{CT} --out afile.txt", ERR, "afile.txt is an existing file"
    ),
    "choose-threshold into a sweep (would mix its results in)": Row(
        "spade", f"{CT} --out sweep_old --overwrite", ERR, "holds a sweep output, not a threshold"
    ),
    "choose-threshold onto an earlier choice": Row(
        "spade", f"{CT} --out choice_old", ERR, "already holds a threshold choice.*--overwrite"
    ),
    # --- outputs inside outputs -----------------------------------------------------------
    "train-lens inside another lens": Row(
        "spade", f"{TL} --out lens/B", ERR, "--out lens/B is inside lens, a lens output"
    ),
    "sweep inside a sweep": Row(
        "spade", f"{SW} --out sweep_old/again", ERR, "is inside sweep_old, a sweep output"
    ),
    "train-lens --overwrite of a lens holding another output": Row(
        "spade",
        f"{TL} --out lens_holding --overwrite",
        ERR,
        "holds lens_holding/inner, a lens output of another command",
    ),
    "report --out inside a sweep it reads": Row(
        "spade", "report sweep_ok --out sweep_ok/figs", ERR, "is inside sweep_ok, a sweep output"
    ),
    "report --out inside a plain folder it reads": Row(
        "spade",
        "report results_dir --out results_dir/figs",
        ERR,
        "is inside results_dir, one of the folders read",
    ),
    "exit_log inside a lens": Row(
        "lm_eval",
        f"{ADAPT},exit_log=lens/exits.jsonl",
        USAGE,
        "exit_log=lens/exits.jsonl is inside",
    ),
    # --- report: what a sweep folder says it holds --------------------------------------
    "report: a results file missing": Row(
        "spade", "report sweep_missing", ERR, r"sweep_missing/results/spade_L1.json is missing"
    ),
    "report: a results file cut short": Row(
        "spade", "report sweep_cut", ERR, "spade_L1.json cannot be read as JSON, so it is cut"
    ),
    "report: a metric that is a string": Row(
        "spade", "report sweep_str", ERR, r'spade_L1.json has acc,none "0.5" for task t'
    ),
    "report: a metric that is NaN": Row(
        "spade", "report sweep_nan", ERR, "spade_L1.json has acc,none NaN for task t"
    ),
    "report: a malformed sweep block": Row(
        "spade", "report sweep_block", ERR, 'malformed sweep block: layer is "one"'
    ),
    "report: a malformed sweep.json field": Row(
        "spade", "report sweep_manifest", ERR, 'sweep.json: field num_layers is "five"'
    ),
    "report: sweep.json cut short": Row(
        "spade", "report sweep_manifest_cut", ERR, "sweep.json cannot be read as JSON"
    ),
    "report: another run's results in a sweep": Row(
        "spade", "report sweep_foreign", ERR, "chosen.json is not one of the 3 results files"
    ),
    "report: the same folder twice": Row(
        "spade", "report sweep_ok sweep_ok/", ERR, "sweep_ok is given twice"
    ),
    "report: a folder and one inside it": Row(
        "spade", "report sweep_ok sweep_ok/results", ERR, "is inside sweep_ok, which is also given"
    ),
    "report --allow-gaps: a results file missing (warned)": Row(
        "spade",
        "report sweep_missing --allow-gaps",
        0,
        r"gap: sweep_missing/results/spade_L1.json is missing .*marked 'gap'(.|\n)*\| gap ",
        "sweep_missing/report",
    ),
    # --- numbers no one can mean, refused by the command line ----------------------------
    "--limit 0 (lm-eval: all)": Row("spade", f"{TL} --out o --limit 0", USAGE, "--limit: 0 is not"),
    "--limit -1 (all but one)": Row(
        "spade", f"{TL} --out o --limit -1", USAGE, "whole number >= 1"
    ),
    "--limit abc": Row("spade", f"{TL} --out o --limit abc", USAGE, "'abc' is not a whole number"),
    "--steps 0": Row("spade", f"{TL} --out o --steps 0", USAGE, "--steps: 0 is not valid"),
    "--steps 2.5": Row("spade", f"{TL} --out o --steps 2.5", USAGE, "not a whole number"),
    "--batch-size 0": Row("spade", f"{TL} --out o --batch-size 0", USAGE, "--batch-size: 0"),
    "--max-length -5": Row("spade", f"{TL} --out o --max-length -5", USAGE, "--max-length: -5"),
    "--lr inf": Row("spade", f"{TL} --out o --lr inf", USAGE, "--lr: inf .*positive finite"),
    "--lr nan": Row("spade", f"{TL} --out o --lr nan", USAGE, "--lr: nan .*positive finite"),
    "--lr 0": Row("spade", f"{TL} --out o --lr 0", USAGE, "--lr: 0 .*positive finite"),
    "--lr=-1e-3": Row("spade", f"{TL} --out o --lr=-1e-3", USAGE, "positive finite"),
    "--lr -0.001": Row("spade", f"{TL} --out o --lr -0.001", USAGE, "positive finite"),
    "--weight-decay -0.1": Row(
        "spade", f"{TL} --out o --weight-decay -0.1", USAGE, "--weight-decay: -0.1 .*>= 0"
    ),
    "--weight-decay nan": Row("spade", f"{TL} --out o --weight-decay nan", USAGE, "finite"),
    "--eval-fraction 1": Row("spade", f"{TL} --out o --eval-fraction 1", USAGE, r"\[0, 1\)"),
    "--eval-fraction -0.1": Row("spade", f"{TL} --out o --eval-fraction -0.1", USAGE, r"\[0, 1\)"),
    "--cache-mb -1": Row("spade", f"{TL} --out o --cache-mb -1", USAGE, "--cache-mb: -1"),
    "--seed -1": Row("spade", f"{TL} --out o --seed -1", USAGE, "--seed: -1"),
    "--seed 2**70": Row("spade", f"{TL} --out o --seed {2**70}", USAGE, "0..4294967295"),
    "--layers -1": Row("spade", f"{TL} --out o --layers -1", USAGE, "--layers: -1"),
    "--kind magic": Row(
        "spade", f"{TL.replace('lspade', 'magic')} --out o", USAGE, "invalid choice"
    ),
    "finetune --limit 0": Row("spade", f"{FT} --out o --limit 0", USAGE, "--limit: 0"),
    "finetune --rank 0": Row("spade", f"{FT} --out o --rank 0", USAGE, "--rank: 0"),
    "finetune --alpha -16": Row("spade", f"{FT} --out o --alpha -16", USAGE, "--alpha: -16"),
    "finetune --dropout 1": Row("spade", f"{FT} --out o --dropout 1", USAGE, r"\[0, 1\)"),
    "finetune --lr inf": Row("spade", f"{FT} --out o --lr inf", USAGE, "positive finite"),
    "sweep --limit 0": Row("spade", f"{SW} --out o --limit 0", USAGE, "--limit: 0 is not"),
    "sweep --limit -1": Row("spade", f"{SW} --out o --limit -1", USAGE, "fraction in"),
    "sweep --limit 2.5": Row("spade", f"{SW} --out o --limit 2.5", USAGE, "--limit: 2.5"),
    "sweep --limit nan": Row("spade", f"{SW} --out o --limit nan", USAGE, "--limit: nan"),
    "sweep --batch-size 0": Row("spade", f"{SW} --out o --batch-size 0", USAGE, "--batch-size"),
    "sweep --bootstrap-iters -1": Row(
        "spade", f"{SW} --out o --bootstrap-iters -1", USAGE, "--bootstrap-iters: -1"
    ),
    "thresholds --thresholds -1 (never passes)": Row(
        "spade",
        f"{ST.replace('--thresholds 1', '--thresholds -1')} --out o",
        ERR,
        "threshold -1 can never pass",
    ),
    "thresholds --thresholds nan": Row(
        "spade",
        f"{ST.replace('--thresholds 1', '--thresholds nan')} --out o",
        ERR,
        "'nan' is not a number",
    ),
    "thresholds --thresholds abc": Row(
        "spade",
        f"{ST.replace('--thresholds 1', '--thresholds 1,abc')} --out o",
        ERR,
        "'abc' is not a number",
    ),
    "thresholds --interval 0": Row("spade", f"{ST} --out o --interval 0", USAGE, "--interval: 0"),
    "thresholds --min-layer -1": Row(
        "spade", f"{ST} --out o --min-layer -1", USAGE, "--min-layer: -1"
    ),
    "thresholds --min-layer 99": Row(
        "spade", f"{ST} --out o --min-layer 99", ERR, "min_layer=99 is out of range"
    ),
    "choose-threshold --interval 6 (model has 5 blocks)": Row(
        "spade", f"{CT} --out o --interval 6", ERR, "interval=6 is above the model's L=5"
    ),
    "sweep --tasks with a task twice (warned)": Row(
        "spade",
        "sweep layers --model {stories} --tasks spade_calibration spade_calibration --limit 1 "
        "--decoders logit_lens --no-full-depth-timing --out twice",
        0,
        "--tasks lists spade_calibration more than once; each task is run once",
        "twice",
    ),
    "choose-threshold --task and --prompts": Row(
        "spade",
        f"{CT} --prompts prompts.jsonl --out o",
        ERR,
        "both --task spade_calibration and --prompts prompts.jsonl were given",
    ),
    "thresholds without --lens or --answer-decoders": Row(
        "spade", f"{ST.replace('--lens lens ', '')} --out o", ERR, "or --answer-decoders"
    ),
    "thresholds --answer-decoders magic": Row(
        "spade", f"{ST} --out o --answer-decoders magic", ERR, "choose from spade, logit_lens, lens"
    ),
    "thresholds --patience without --answer-decoders": Row(
        "spade", f"{ST} --out o --patience 1", ERR, "--patience needs --answer-decoders"
    ),
    "thresholds --patience -1": Row(
        "spade", f"{ST} --out o --answer-decoders spade --patience -1", ERR, "whole number"
    ),
    "transfer --lens without TASK=": Row("spade", f"{SX} --out o --lens lens", ERR, "TASK=DIR"),
    "transfer --train-limit 0": Row(
        "spade", f"{SX} --out o --train-limit 0", USAGE, "--train-limit"
    ),
    "transfer --lens-lr inf": Row("spade", f"{SX} --out o --lens-lr inf", USAGE, "--lens-lr: inf"),
    "transfer --lens-steps 0": Row("spade", f"{SX} --out o --lens-steps 0", USAGE, "--lens-steps"),
    "calibrate --heads 3 (64 not a multiple)": Row(
        "spade", "calibrate --out o --heads 3", ERR, "not a multiple of heads=3"
    ),
    "calibrate --lr inf": Row("spade", "calibrate --out o --lr inf", USAGE, "--lr: inf"),
    "calibrate --sum-weight -1": Row(
        "spade", "calibrate --out o --sum-weight -1", USAGE, "--sum-weight: -1"
    ),
    "calibrate --layers 0": Row("spade", "calibrate --out o --layers 0", USAGE, "--layers: 0"),
    "demo --limit 0": Row("spade", "demo --out o --limit 0", USAGE, "--limit: 0"),
    "demo --threshold -1 (never passes)": Row(
        "spade", "demo --out o --threshold -1", USAGE, "nats >= 0"
    ),
    "demo --data-dir without --model": Row(
        "spade", "demo --out o --data-dir notours", ERR, "add --model"
    ),
    "sweep --model-args sets exit_layer": Row(
        "spade", f"{SW} --out o --model-args exit_layer=3", ERR, "sets exit_layer"
    ),
    "sweep --decoders magic": Row("spade", f"{SW} --out o --decoders magic", ERR, "'magic'"),
    # --- training data ------------------------------------------------------------------
    "--data missing file": Row(
        "spade", f"{TL.replace('prompts', 'missing')} --out o", ERR, "missing.jsonl does not exist"
    ),
    "--data record without a prompt field": Row(
        "spade", f"{TL.replace('prompts', 'bad_field')} --out o", ERR, "has no prompt / text"
    ),
    "--data line not JSON": Row(
        "spade", f"{TL.replace('prompts', 'not_json')} --out o", ERR, "not_json.jsonl:1 is not JSON"
    ),
    "--data empty file": Row(
        "spade", f"{TL.replace('prompts', 'empty')} --out o", ERR, "holds no non-empty text"
    ),
    "--data null prompt": Row(
        "spade", f"{TL.replace('prompts', 'null_prompt')} --out o", ERR, "prompt is NoneType"
    ),
    "--data not UTF-8": Row(
        "spade", f"{TL.replace('prompts', 'binary')} --out o", ERR, "is not UTF-8 text"
    ),
    "--data a CSV file": Row(
        "spade", f"{TL.replace('prompts.jsonl', 'data.csv')} --out o", ERR, "unsupported file type"
    ),
    "--data a folder": Row(
        "spade", f"{TL.replace('prompts.jsonl', 'notours')} --out o", ERR, "is a folder"
    ),
    "--data unknown task": Row(
        "spade",
        f"{TL.replace('prompts.jsonl', 'no_such_task')} --out o",
        ERR,
        "neither a file nor an lm-eval task",
    ),
    # --- models, adapters, lenses given to the commands -------------------------------------
    "--model that does not exist": Row(
        "spade",
        f"{TL.replace('{stories}', '/no/such/model')} --out o",
        ERR,
        "--model /no/such/model does not exist",
    ),
    "--model folder without config.json": Row(
        "spade", f"{TL.replace('{stories}', 'model_noconfig')} --out o", ERR, "without config.json"
    ),
    "--model a file": Row(
        "spade", f"{TL.replace('{stories}', 'afile.txt')} --out o", ERR, "is a file"
    ),
    "--peft folder without an adapter": Row(
        "spade", f"{TL} --out o --peft adapter_empty", ERR, "holds no adapter_config.json"
    ),
    "--peft that does not exist": Row(
        "spade", f"{TL} --out o --peft /no/adapter", ERR, "is not an adapter folder"
    ),
    "--layers 99 (model has 5 blocks)": Row(
        "spade", f"{TL} --out o --layers 99", ERR, r"layers \[99\] are out of range"
    ),
    "export-lens of a missing lens": Row("spade", "export-lens nope o", ERR, "is not a directory"),
    "export-lens of an L-SPADE lens": Row(
        "spade", "export-lens lens o", ERR, "only tuned_lens lenses export"
    ),
    "export-lens of a lens without weights hash": Row(
        "spade", "export-lens lens_nohash o", ERR, r"lacks \['weights_sha256'\]"
    ),
    "sweep --lens without weights hash": Row(
        "spade", f"{SW} --out o --lens lens_nohash", ERR, r"lacks \['weights_sha256'\]"
    ),
    "sweep --lens missing": Row("spade", f"{SW} --out o --lens nope", ERR, "is not a directory"),
    "report of a missing folder": Row("spade", "report nope", ERR, "nope is not a folder"),
    "report of a folder without results": Row(
        "spade", "report notours --out r", ERR, "holds no lm-eval results"
    ),
    # --- training that turns non-finite: stops, saves nothing -------------------------------
    "--lr 1e39 (overflows float32)": Row("spade", f"{TL} --out o --lr 1e39", USAGE, "3.4e38"),
    "train-lens --lr 1e38 (Adam's update overflows)": Row(
        "spade",
        f"{TL} --out o --lr 1e38 --steps 3",
        ERR,
        "training stopped at step 1 of 3: the update overflowed float32.*learning rate",
    ),
    "train-lens --lr 1e38 --optimizer sgd (weights overflow)": Row(
        "spade",
        f"{TL} --out o --lr 1e38 --steps 3 --optimizer sgd",
        ERR,
        "step 1 of 3: the weight translators.* became -?inf after the update",
    ),
    "train-lens on a model with a NaN weight": Row(
        "spade",
        f"{TL.replace('{stories}', 'model_nan')} --out o",
        ERR,
        "step 1 of 1: the loss is nan.*before any update",
    ),
    # --- offline data --------------------------------------------------------------------
    "data dir that does not exist": Row(
        "spade",
        f"{ARC} --out o",
        ERR,
        "LM_EVAL_SPADE_DATA_DIR=nope is not a directory",
        env=data_dir("nope"),
    ),
    "data record without answerKey": Row(
        "spade",
        f"{ARC} --out o",
        ERR,
        r"record 4 lacks \['answerKey'\]",
        env=data_dir("data_missing_field"),
    ),
    "data answer key not among the labels": Row(
        "spade",
        f"{ARC} --out o",
        ERR,
        "answerKey 'Z', which is not among",
        env=data_dir("data_bad_key"),
    ),
    "data choice without text": Row(
        "spade",
        f"{ARC} --out o",
        ERR,
        r"a choice of record 2 lacks \['text'\]",
        env=data_dir("data_bad_choice"),
    ),
    "data file cut at a line boundary (warned)": Row(
        "spade",
        f"{ARC} --out trunc_lens",
        0,
        "ARC-Easy-Test.jsonl differs from its release file .* 100 records where the release "
        "has 2376",
        "trunc_lens",
        data_dir("data_truncated"),
    ),
    # --- spade-exit model_args through lm_eval ------------------------------------------
    "exit_layer=-1 (lm-eval makes it -1.0)": Row(
        "lm_eval", f"{LM},exit_layer=-1", USAGE, "exit_layer=-1 is out of range"
    ),
    "exit_layer=99": Row("lm_eval", f"{LM},exit_layer=99", USAGE, "exit_layer=99 is out of range"),
    "exit_layer= (empty)": Row("lm_eval", f"{LM},exit_layer=", USAGE, "exit_layer= gives no value"),
    "exit_layer=None (would run plain hf)": Row(
        "lm_eval", f"{LM},exit_layer=None", USAGE, "exit_layer=None gives no value"
    ),
    "exit_layer=--3": Row("lm_eval", f"{LM},exit_layer=--3", USAGE, "'--3' must be an integer"),
    "exit_layer=2.5": Row("lm_eval", f"{LM},exit_layer=2.5", USAGE, "2.5 must be an integer"),
    "exit_layer=true": Row("lm_eval", f"{LM},exit_layer=true", USAGE, "not a boolean"),
    "exit_layr=3 (misspelt)": Row("lm_eval", f"{LM},exit_layr=3", USAGE, "unknown model_args"),
    "exit_layer and threshold": Row(
        "lm_eval", f"{LM},exit_layer=2,threshold=1", USAGE, "give one of them"
    ),
    "threshold=-1 (never passes)": Row(
        "lm_eval",
        f"{ADAPT.replace('threshold=1', 'threshold=-1')}",
        USAGE,
        "threshold=-1 can never pass",
    ),
    "threshold=nan": Row(
        "lm_eval", ADAPT.replace("threshold=1", "threshold=nan"), USAGE, "must be a number"
    ),
    "threshold=abc": Row(
        "lm_eval", ADAPT.replace("threshold=1", "threshold=abc"), USAGE, "must be a number"
    ),
    "threshold= (empty)": Row(
        "lm_eval", ADAPT.replace("threshold=1", "threshold="), USAGE, "threshold= gives no value"
    ),
    "threshold without a confidence source": Row(
        "lm_eval", f"{LM},threshold=1", USAGE, "needs a confidence source"
    ),
    "interval=0": Row("lm_eval", f"{ADAPT},interval=0", USAGE, "interval=0 must be at least 1"),
    "interval=-1 (lm-eval makes it -1.0)": Row(
        "lm_eval", f"{ADAPT},interval=-1", USAGE, "interval=-1 must be at least 1"
    ),
    "min_layer=-1": Row("lm_eval", f"{ADAPT},min_layer=-1", USAGE, "min_layer=-1 is out of range"),
    "interval=6 (model has 5 blocks)": Row(
        "lm_eval", f"{ADAPT},interval=6", USAGE, "interval=6 is above the model's L=5"
    ),
    "min_layer=5 (the last block)": Row(
        "lm_eval", f"{ADAPT},min_layer=5", USAGE, "min_layer=5 is out of range"
    ),
    "interval without threshold": Row(
        "lm_eval", f"{LM},exit_layer=2,interval=2", USAGE, "only apply to adaptive exits"
    ),
    "exit_log= (empty)": Row("lm_eval", f"{ADAPT},exit_log=", USAGE, "exit_log= gives no value"),
    "decoder=magic": Row(
        "lm_eval", f"{LM},exit_layer=2,decoder=magic", USAGE, "'magic' is not valid"
    ),
    "decoder without a layer": Row("lm_eval", f"{LM},decoder=spade", USAGE, "add exit_layer=K"),
    "decoder=lspade without lens": Row(
        "lm_eval", f"{LM},exit_layer=2,decoder=lspade", USAGE, "add lens=DIR"
    ),
    "spade_positions=middle": Row(
        "lm_eval", f"{LM},exit_layer=2,spade_positions=middle", USAGE, "'middle' is not valid"
    ),
    "confidence=magic": Row("lm_eval", f"{ADAPT},confidence=magic", USAGE, "'magic' is not valid"),
    "confidence_decoder=spade": Row(
        "lm_eval", f"{LM},threshold=1,confidence_decoder=spade", USAGE, "SPADE itself"
    ),
    "kv_strategy=magic": Row(
        "lm_eval", f"{LM},exit_layer=2,kv_strategy=magic", USAGE, "'magic' is not valid"
    ),
    "kv_strategy without exits": Row("lm_eval", f"{LM},kv_strategy=copy", USAGE, "only applies"),
    "kv_strategy=fill with logit lens": Row(
        "lm_eval",
        f"{LM},exit_layer=2,decoder=logit_lens,kv_strategy=fill",
        USAGE,
        "kv_strategy=fill takes keys",
    ),
    "lens without a lens decoder": Row(
        "lm_eval", f"{LM},exit_layer=2,lens=lens", USAGE, "lens=lens is only used"
    ),
    "lens= (empty)": Row("lm_eval", f"{LM},exit_layer=2,decoder=lspade,lens=", USAGE, "no value"),
    "pretrained that does not exist": Row(
        "lm_eval",
        LM.replace("{stories}", "/no/such/model") + ",exit_layer=2",
        USAGE,
        "pretrained=/no/such/model does not exist",
    ),
    "pretrained folder without config.json": Row(
        "lm_eval", LM.replace("{stories}", "model_noconfig"), USAGE, "without config.json"
    ),
    "pretrained a file": Row("lm_eval", LM.replace("{stories}", "afile.txt"), USAGE, "is a file"),
    "peft folder without an adapter": Row(
        "lm_eval", f"{LM},peft=adapter_empty", USAGE, "peft=adapter_empty holds no adapter_config"
    ),
    "peft that does not exist": Row(
        "lm_eval", f"{LM},peft=/no/adapter", USAGE, "peft=/no/adapter is not an adapter folder"
    ),
}

#: Lenses that must be refused, with what the error names (loaded by decoder=lspade).
BAD_LENSES = {
    "nope": "is not a directory",
    "lens_nohash": r"lacks \['weights_sha256'\]",
    "lens_headblank": "head_hash is '', but must be a SHA-256",
    "lens_nohead": r"lacks \['head_hash'\]",
    "lens_strversion": "version '1' is not one",
    "lens_newer": "version 99 is not one.*upgrade",
    "lens_format": "format 'other'",
    "lens_strlayers": "num_layers is '5', but must be an integer",
    "lens_boollayers": "num_layers is True, but must be an integer",
    "lens_strhidden": "hidden_size is '64'",
    "lens_layerlist": r"layers is \[0, 0, 9\]",
    "lens_layerstr": "layers is '0-4'",
    "lens_biasstr": "bias is 'yes'",
    "lens_training": r"training is \[\]",
    "lens_fingerprint": "head_fingerprint is",
    "lens_kind": "kind is 'magic'",
    "lens_extra": r"fields \['trust_me'\]",
    "lens_vocab": "vocab_size is -1",
    "lens_flipped": "truncated or corrupt",
    "lens_truncated": "truncated or corrupt",
    "lens_nan": "holds nan",
    "lens_other": r"another final norm \+ LM head",
    "tuned": "is a tuned_lens lens, but decoder=lspade",
}
BAD_TUNED_LENSES = {
    "tuned_nohash": r"lacks \['unembed_hash'\]",
    "tuned_strd": "d_model is '64'",
}
for name, words in BAD_LENSES.items():
    ROWS[f"lens={name}"] = Row(
        "lm_eval", f"{LM},exit_layer=2,decoder=lspade,lens={name}", USAGE, words
    )
for name, words in BAD_TUNED_LENSES.items():
    ROWS[f"lens={name}"] = Row(
        "lm_eval", f"{LM},exit_layer=2,decoder=tuned_lens,lens={name}", USAGE, words
    )
ROWS.update(
    {
        # --- faults that only show while scoring --------------------------------------------
        "lens whose weights overflow: NaN confidence": Row(
            "lm_eval+",
            f"{LM},threshold=1,lens=lens_huge",
            USAGE,
            r"confidence \(entropy\) came out NaN",
        ),
        "model with a NaN weight, fixed exit": Row(
            "lm_eval+",
            LM.replace("{stories}", "model_nan") + ",exit_layer=2",
            USAGE,
            "as nan, not a finite number",
        ),
        "model with a NaN weight, plain hf path": Row(
            "lm_eval+", LM.replace("{stories}", "model_nan"), USAGE, "as nan, not a finite number"
        ),
        "kv_strategy on a loglikelihood-only run (warned)": Row(
            "lm_eval+",
            f"{LM},exit_layer=2,kv_strategy=copy",
            0,
            "kv_strategy=copy has no effect on these 8 loglikelihood requests",
        ),
        "generation with temperature=inf": Row(
            "lm_eval+",
            f"{LM.replace('spade_calibration', 'gen_inf')},exit_layer=3",
            USAGE,
            "temperature=inf must be a finite number",
        ),
        # --- the real executables, in a subprocess ----------------------------------------
        "spade! train-lens into a folder not ours": Row(
            "spade!", f"{TL} --out notours", ERR, "did not write"
        ),
        "spade! train-lens --limit -1": Row(
            "spade!", f"{TL} --out o --limit -1", USAGE, "whole number >= 1"
        ),
        "spade! train-lens --model that does not exist": Row(
            "spade!", f"{TL.replace('{stories}', '/no/model')} --out o", ERR, "does not exist"
        ),
        "spade! --model hub id, hub unreachable": Row(
            "spade!",
            f"{TL.replace('{stories}', 'someone/missing-model')} --out o",
            ERR,
            "someone/missing-model is not a local folder, and loading it from the hub failed",
        ),
        "spade! sweep onto an earlier sweep": Row(
            "spade!", f"{SW} --out sweep_old", ERR, "add --overwrite"
        ),
        "spade! hub unreachable, no data dir": Row(
            "spade!",
            f"{ARC} --out o",
            ERR,
            "could not be loaded from the hub .*set LM_EVAL_SPADE_DATA_DIR",
            env=(("LM_EVAL_SPADE_DATA_DIR", None),),
        ),
        "spade! Ctrl-C while training": Row(
            "spade!",
            f"{TL.replace('--steps 1', '--steps 100000')} --out o",
            130,
            "^lm-eval-spade train-lens: interrupted; no output was written$",
            interrupt_at=r"train lspade: .*\| [1-9]\d*/100000",  # after a step
        ),
        "lm_eval! Ctrl-C while scoring": Row(
            "lm_eval!",
            f"{LM},exit_layer=2 --batch_size 1",
            130,
            "^lm_eval: interrupted",
            interrupt_at=r"Scoring at layer 2 \(spade\): .*\| [1-9]\d*/",  # while scoring
        ),
        "lm_eval! exit_layer=-1": Row(
            "lm_eval!", f"{LM},exit_layer=-1", USAGE, "exit_layer=-1 is out of range"
        ),
        "lm_eval! NaN confidence while scoring": Row(
            "lm_eval!",
            f"{LM},threshold=1,lens=lens_huge --limit 2",
            USAGE,
            r"confidence \(entropy\) came out NaN",
        ),
    }
)

#: A generation task whose kwargs ask for temperature=inf.
GEN_TASK = GENERATION_YAML.replace("story_generation_test", "gen_inf").replace(
    "do_sample: false", "do_sample: true\n  temperature: .inf"
)


@pytest.fixture(scope="module")
def sandbox_dir(tmp_path_factory) -> Path:
    root = sandbox.build(tmp_path_factory.mktemp("sandbox"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "gen_inf.yaml").write_text(GEN_TASK.format(data=root / "prompts.jsonl"))
    return root


@pytest.fixture(scope="module")
def task_manager(sandbox_dir):
    """lm-eval's task index for the scoring rows, built once."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(sandbox_dir / "tasks"))


def _argv(row: Row) -> list[str]:
    return shlex.split(row.argv.format(stories=STORIES))


def _run(row: Row, root: Path, task_manager) -> object:
    env = dict(row.env)
    if row.runner == "spade":
        return run_spade_cli(_argv(row), root, env)
    if row.runner == "lm_eval":
        return run_lm_eval_model(_argv(row), root, env=env)
    if row.runner == "lm_eval+":
        from lm_eval.evaluator import evaluate

        argv = _argv(row)
        task = argv[argv.index("--tasks") + 1]
        tasks = task_manager.load([task])
        return run_lm_eval_model(
            argv, root, lambda lm: evaluate(lm, tasks, limit=2, verbosity="ERROR"), env
        )
    program = {"spade!": "lm-eval-spade", "lm_eval!": "lm_eval"}[row.runner]
    if row.interrupt_at:
        return run_interrupted(program, _argv(row), root, row.interrupt_at, command_env(**env))
    return run_command(program, _argv(row), root, command_env(**env))


def _check(name: str, row: Row, root: Path, task_manager) -> None:
    watched = [root, STORIES, calibration.ASSETS]
    before = snapshot(*watched)
    outcome = _run(row, root, task_manager)
    after = snapshot(*watched)
    assert outcome.status == row.status, (
        f"{name}: status {outcome.status}\n{outcome.output[-3000:]}"
    )
    assert "Traceback" not in outcome.output, f"{name}:\n{outcome.output[-3000:]}"
    if row.status:
        (line,) = outcome.error_lines  # exactly one error line, on its own
        assert line.startswith(("lm-eval-spade ", "lm_eval: ", "lm-eval ")), f"{name}: {line}"
        assert re.search(row.words, line), f"{name}: {line}"
    else:
        assert re.search(row.words, outcome.output), f"{name}:\n{outcome.output[-3000:]}"
    allowed = [root / row.out] if row.out else []
    assert changes(before, after, allowed) == [], name


FAST = {k: r for k, r in ROWS.items() if not r.runner.endswith("!")}
SLOW = {k: r for k, r in ROWS.items() if r.runner.endswith("!")}


def test_the_table_has_over_100_rows():
    assert len(ROWS) >= 100


@pytest.mark.parametrize("name", list(FAST))
def test_bad_input(name, sandbox_dir, task_manager):
    _check(name, FAST[name], sandbox_dir, task_manager)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SLOW))
def test_bad_input_through_the_executable(name, sandbox_dir):
    _check(name, SLOW[name], sandbox_dir, None)
