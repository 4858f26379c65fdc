"""Portable paths in outputs (`lm_eval_spade/paths.py`)."""

from __future__ import annotations

import json

from lm_eval_spade.paths import make_file_portable, portable, portable_path, portable_text
from lm_eval_spade.tasks.configs import task_dir

SITE = "/opt/venv/lib/python3.11/site-packages"


def test_each_kind_of_path_has_its_portable_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert portable_path(f"{SITE}/lm_eval/tasks/arc/arc_easy.yaml") == (
        "lm_eval/tasks/arc/arc_easy.yaml"
    )
    assert portable_path(task_dir() / "boolq_spade.yaml") == "task_configs/boolq_spade.yaml"
    assert portable_path(str(tmp_path / ".cache" / "models" / "m")) == ".cache/models/m"
    assert portable_path(str(tmp_path)) == "."
    assert portable_path("/srv/models/smollm2-135m/") == "smollm2-135m"
    assert portable_path("/model") == "model"
    hub = "/h/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/0a1b"
    assert portable_path(hub) == "HuggingFaceTB/SmolLM2-135M"
    for kept in ("runs/adapter", "HuggingFaceTB/SmolLM2-135M", "", "cpu"):
        assert portable_path(kept) == kept
    assert portable_path("/old/checkout/task_configs/x.yaml", roots=["/old/checkout"]) == (
        "task_configs/x.yaml"
    )


def test_strings_of_an_output_keep_everything_but_their_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {
        "model_args": "pretrained=/srv/m/SmolLM2,peft=/srv/a/arc,exit_layer=3,dtype=float32",
        "configs": {"arc": {"config_source": f"{SITE}/lm_eval/tasks/arc/arc_easy.yaml"}},
        "command": f"lm_eval --model_args pretrained=/srv/m/x --include_path {tmp_path}/tasks",
        "kept": ["https://huggingface.co/a/b", "/(\\d+)/", "1/2", "and/or", 0.25, None, True],
        "/srv/key/not/rewritten": 1,
    }
    assert portable(data) == {
        "model_args": "pretrained=SmolLM2,peft=arc,exit_layer=3,dtype=float32",
        "configs": {"arc": {"config_source": "lm_eval/tasks/arc/arc_easy.yaml"}},
        "command": "lm_eval --model_args pretrained=x --include_path tasks",
        "kept": data["kept"],
        "/srv/key/not/rewritten": 1,
    }
    assert portable_text("base_model:adapter:/srv/m/SmolLM2") == "base_model:adapter:SmolLM2"


def test_a_file_another_library_wrote_keeps_its_formatting(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text('{\n  "base_model_name_or_path": "/srv/m/SmolLM2",\n  "r": 8\n}\n')
    assert make_file_portable(config)
    assert config.read_text() == '{\n  "base_model_name_or_path": "SmolLM2",\n  "r": 8\n}\n'
    assert json.loads(config.read_text())["r"] == 8
    assert not make_file_portable(config)
