"""A folder of inputs a careless or unlucky user would hand the commands: lenses damaged
in every way a config edit or a bad copy makes, data files with missing fields, outputs
of earlier runs (one holding another), sweep folders broken in every way `report` must
notice, folders and files that are not ours, a model with a NaN weight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers as T
from lmutil import DATA, STORIES, save_tiny_model
from safetensors.torch import load_file, save_file

from lm_eval_spade.architectures import architecture_for
from lm_eval_spade.files import MARKER
from lm_eval_spade.lens import Lens, LensKind, export_tuned_lens, save_lens
from lm_eval_spade.sweeps.results import MANIFEST, Setting, contents, write_manifest
from lm_eval_spade.sweeps.settings import SweepSettings

PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "Tom was sad because he lost his red ball. His mom",
    "One day, a big dog came to the park. The dog was very happy and",
    "The sun was shining and the birds were",
]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2))


def _edit_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    _write_json(dst / "config.json", config)
    return dst


def _weights_edited(src: Path, dst: Path, value: float) -> Path:
    """A copy whose translator weights are all `value`, with a matching SHA-256 (so only
    the value check can refuse it)."""
    from lm_eval_spade.lens.checkpoint import _sha256

    shutil.copytree(src, dst)
    tensors = load_file(dst / "translators.safetensors")
    tensors = {
        k: torch.full_like(v, value) if k.endswith("weight") else v for k, v in tensors.items()
    }
    save_file(tensors, dst / "translators.safetensors", metadata={"format": "lm-eval-spade-lens"})
    config = json.loads((dst / "config.json").read_text())
    config["weights_sha256"] = _sha256(dst / "translators.safetensors")
    _write_json(dst / "config.json", config)
    return dst


def _lenses(root: Path) -> None:
    model = T.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    arch = architecture_for(model)
    lens = save_lens(Lens.untrained(arch, LensKind.LSPADE), root / "lens")
    tuned = save_lens(Lens.untrained(arch, LensKind.TUNED_LENS), root / "tuned")
    export_tuned_lens(Lens.untrained(arch, LensKind.TUNED_LENS), root / "tuned_export")

    def drop(key):
        return lambda c: c.pop(key)

    def put(key, value):
        return lambda c: c.update({key: value})

    edits = {
        "lens_nohash": drop("weights_sha256"),
        "lens_headblank": put("head_hash", ""),
        "lens_nohead": drop("head_hash"),
        "lens_strversion": put("format_version", "1"),
        "lens_strlayers": put("num_layers", "5"),
        "lens_strhidden": put("hidden_size", "64"),
        "lens_boollayers": put("num_layers", True),
        "lens_layerlist": put("layers", [0, 0, 9]),
        "lens_layerstr": put("layers", "0-4"),
        "lens_biasstr": put("bias", "yes"),
        "lens_training": put("training", []),
        "lens_fingerprint": put("head_fingerprint", ["NaN"]),
        "lens_kind": put("kind", "magic"),
        "lens_extra": put("trust_me", True),
        "lens_newer": put("format_version", 99),
        "lens_format": put("format", "other"),
        "lens_vocab": put("vocab_size", -1),
    }
    for name, edit in edits.items():
        _edit_config(lens, root / name, edit)
    flipped = shutil.copytree(lens, root / "lens_flipped")
    data = (flipped / "translators.safetensors").read_bytes()
    (flipped / "translators.safetensors").write_bytes(
        data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]
    )
    truncated = shutil.copytree(lens, root / "lens_truncated")
    (truncated / "translators.safetensors").write_bytes(data[: len(data) // 2])
    _weights_edited(lens, root / "lens_nan", float("nan"))
    _weights_edited(lens, root / "lens_huge", 3e38)  # finite, but overflows when applied
    for name, edit in {
        "tuned_nohash": drop("unembed_hash"),
        "tuned_strd": put("d_model", "64"),
    }.items():
        _edit_config(root / "tuned_export", root / name, edit)
    other = save_tiny_model(T.LlamaConfig.from_pretrained(STORIES), root / "other_model", seed=3)
    other_arch = architecture_for(T.AutoModelForCausalLM.from_pretrained(other))
    save_lens(Lens.untrained(other_arch, LensKind.LSPADE), root / "lens_other")
    assert tuned.is_dir()


def _model_with_nan(root: Path) -> None:
    out = shutil.copytree(STORIES, root / "model_nan")
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def _data(root: Path) -> None:
    records = [{"prompt": p, "ending": " play"} for p in PROMPTS]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "bad_field.jsonl").write_text(json.dumps({"question": PROMPTS[0]}) + "\n")
    (root / "not_json.jsonl").write_text("Once upon a time\n")
    (root / "empty.jsonl").write_text("\n")
    (root / "null_prompt.jsonl").write_text(json.dumps({"prompt": None}) + "\n")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00\x81")
    (root / "data.csv").write_text("prompt\nOnce upon a time\n")


def _offline_copy(root: Path, name: str, edit_test) -> Path:
    """ARC-Easy's release files with the test file changed by `edit_test(lines)`."""
    src = DATA / "arc" / "ARC-Easy"
    dst = root / name / "arc" / "ARC-Easy"
    dst.mkdir(parents=True)
    for path in src.iterdir():
        lines = path.read_text().splitlines(keepends=True)
        if path.name.endswith("Test.jsonl"):
            lines = edit_test(lines)
        (dst / path.name).write_text("".join(lines))
    return root / name


def _offline(root: Path) -> None:
    def drop_key(lines):
        record = json.loads(lines[3])
        del record["answerKey"]
        return [*lines[:3], json.dumps(record) + "\n", *lines[4:]]

    def bad_key(lines):
        record = json.loads(lines[3])
        record["answerKey"] = "Z"
        return [*lines[:3], json.dumps(record) + "\n", *lines[4:]]

    def bad_choice(lines):
        record = json.loads(lines[1])
        del record["question"]["choices"][0]["text"]
        return [lines[0], json.dumps(record) + "\n", *lines[2:]]

    _offline_copy(root, "data_missing_field", drop_key)
    _offline_copy(root, "data_bad_key", bad_key)
    _offline_copy(root, "data_bad_choice", bad_choice)
    _offline_copy(root, "data_truncated", lambda lines: lines[:100])  # cut at a line boundary


def _earlier_outputs(root: Path) -> None:
    """Folders as earlier runs of other commands left them, and folders not ours."""
    kinds = {"sweep_old": "sweep", "adapter_old": "LoRA adapter", "choice_old": "threshold choice"}
    for name, kind in kinds.items():
        (root / name).mkdir()
        _write_json(root / name / MARKER, {"kind": kind})
        (root / name / "keep.txt").write_text("an earlier run's output\n")
    results = root / "results_dir"
    results.mkdir()
    _write_json(
        results / "results_x.json",
        {"results": {"t": {"acc,none": 0.5}}, "config": {"model": "hf"}},
    )
    (results / "report").mkdir()
    _write_json(results / "report" / MARKER, {"kind": "report"})
    (root / "notours").mkdir()
    (root / "notours" / "notes.txt").write_text("my own notes, not lm-eval-spade's\n")
    (root / "afile.txt").write_text("a user's file\n")
    (root / "adapter_empty").mkdir()
    (root / "adapter_empty" / "README.md").write_text("no adapter here\n")
    (root / "model_noconfig").mkdir()
    (root / "model_noconfig" / "weights.bin").write_bytes(b"\0" * 16)
    # a lens holding another output (copied in by hand: no command writes one there)
    holding = shutil.copytree(root / "lens", root / "lens_holding")
    shutil.copytree(root / "lens", holding / "inner")


def _sweep_result(layer: int, value: float) -> dict:
    """A layer sweep's results file for SPADE at `layer` (as `results.evaluate_setting`
    writes it, on a task `t` of 4 documents)."""
    return {
        "results": {"t": {"alias": "t", "acc,none": value, "acc_stderr,none": 0.25}},
        "config": {
            "model": "spade-exit",
            "model_args": f"pretrained={STORIES},exit_layer={layer}",
            "spade": {"tasks": {"t": {"mean_exit_layer": layer, "compute_fraction": layer / 5}}},
        },
        "n-samples": {"t": {"original": 4, "effective": 4}},
        "sweep": {
            "setting": f"spade_L{layer}",
            "kind": "layers",
            "decoder": "spade",
            "decoder_label": "SPADE",
            "layer": layer,
            "num_layers": 5,
        },
    }


def _sweeps(root: Path) -> None:
    """A complete layer sweep (`sweep_ok`, three results files listed in its sweep.json)
    and copies broken as a crash, a bad copy or an edit leaves them."""
    ok = root / "sweep_ok"
    written = [_sweep_result(k, 0.25 * (k + 1)) for k in range(3)]
    for data in written:
        path = ok / "results" / f"{data['sweep']['setting']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, data)
    settings = SweepSettings(model=str(STORIES), tasks=["t"], out=ok)
    points = [Setting(d["sweep"]["setting"], None, d["sweep"]) for d in written]
    write_manifest(ok, "layers", settings, num_layers=5, **contents(points, written))
    _write_json(ok / MARKER, {"kind": "sweep", "parts": []})

    def broken(name: str, edit) -> None:
        edit(shutil.copytree(ok, root / name))

    def results_edit(key, value):
        def edit(folder: Path) -> None:
            data = json.loads((folder / "results" / "spade_L1.json").read_text())
            data["results"]["t"][key] = value
            _write_json(folder / "results" / "spade_L1.json", data)

        return edit

    def block_edit(folder: Path) -> None:
        data = json.loads((folder / "results" / "spade_L1.json").read_text())
        data["sweep"]["layer"] = "one"
        _write_json(folder / "results" / "spade_L1.json", data)

    def manifest_edit(folder: Path) -> None:
        data = json.loads((folder / MANIFEST).read_text())
        data["num_layers"] = "five"
        _write_json(folder / MANIFEST, data)

    def cut(path: Path) -> None:
        text = path.read_text()
        path.write_text(text[: len(text) // 2])

    broken("sweep_missing", lambda f: (f / "results" / "spade_L1.json").unlink())
    broken("sweep_cut", lambda f: cut(f / "results" / "spade_L1.json"))
    broken("sweep_str", results_edit("acc,none", "0.5"))
    broken("sweep_nan", results_edit("acc,none", float("nan")))
    broken("sweep_block", block_edit)
    broken("sweep_manifest", manifest_edit)
    broken("sweep_manifest_cut", lambda f: cut(f / MANIFEST))
    broken(
        "sweep_foreign",
        lambda f: shutil.copy(f / "results" / "spade_L1.json", f / "results" / "chosen.json"),
    )


def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _lenses(root)
    _model_with_nan(root)
    _data(root)
    _offline(root)
    _earlier_outputs(root)
    _sweeps(root)
    return root
