"""Make `--model spade-exit`, the package's tasks and its offline data setting work in
lm-eval without a wrapper script.

lm-eval 0.4.13 has no plugin discovery for models or task folders, and `get_model`
imports its built-in models only while its registry is empty. The wheel installs
`lm_eval_spade.pth` into site-packages, which imports this module at interpreter start.
It imports nothing heavy: it adds a finder that waits for some lm-eval modules and,
once each has run, applies this package's addition to it:

- `lm_eval.api.registry`: register `spade-exit` lazily (the model module, and so torch,
  loads only when the name is used) and lm-eval's built-in models;
- `lm_eval.api.task`: datasets from `LM_EVAL_SPADE_DATA_DIR` when it is set
  (`lm_eval_spade.tasks.offline`);
- `lm_eval.tasks.manager`: the package's task folder next to lm-eval's own
  (`lm_eval_spade.tasks.configs`);
- `lm_eval._cli.harness` (the `lm_eval` command): this package's input errors end the
  command with one line (`lm_eval_spade._startup.cli_errors`);
- `lm_eval.utils`: `make_table` follows spade-exit's results table with its exit table
  (`lm_eval_spade._startup.lm_eval_output`), and `setup_logging` gives this package's
  log lines lm-eval's format and level (`lm_eval_spade.logs`);
- `lm_eval.api.model`: `--use_cache` keeps spade-exit's answers apart per setting, with
  their exits (`lm_eval_spade.answer_cache`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

MODEL_NAME = "spade-exit"
MODEL_TARGET = "lm_eval_spade.model:SpadeExitLM"


def register_models(registry_module: ModuleType) -> None:
    """Register `spade-exit` and lm-eval's built-in models in lm-eval's model registry."""
    registry = registry_module.model_registry
    if isinstance(getattr(registry, "_objs", None), dict) and MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_TARGET)
    # Our entry makes the registry non-empty, which stops `get_model` from importing the
    # built-ins on its own; importing `lm_eval.models` registers them (lazily, cheaply).
    import lm_eval.models  # noqa: F401


def _call(targets: tuple[str, ...], module: ModuleType) -> None:
    for target in targets:
        module_name, function = target.split(":")
        getattr(importlib.import_module(module_name), function)(module)


#: lm-eval module -> what to run on it once it has been executed.
AFTER_LOAD = {
    "lm_eval.api.registry": ("lm_eval_spade._startup.hook:register_models",),
    "lm_eval.api.task": ("lm_eval_spade.tasks.offline:install",),
    "lm_eval.tasks.manager": ("lm_eval_spade.tasks.configs:install",),
    "lm_eval._cli.harness": ("lm_eval_spade._startup.cli_errors:install",),
    "lm_eval.utils": (
        "lm_eval_spade._startup.lm_eval_output:install_exit_table",
        "lm_eval_spade.logs:follow_lm_eval_logging",
    ),
    "lm_eval.api.model": ("lm_eval_spade.answer_cache:install",),
}


class _RunAfterLoad(importlib.abc.Loader):
    """Wraps a module's real loader and applies our addition once the module has run."""

    def __init__(self, wrapped: importlib.abc.Loader, targets: tuple[str, ...]) -> None:
        self._wrapped = wrapped
        self._targets = targets

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        _call(self._targets, module)


class _LmEvalFinder(importlib.abc.MetaPathFinder):
    """Finds the modules of `AFTER_LOAD` through the other finders and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        if fullname not in AFTER_LOAD:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RunAfterLoad(spec.loader, AFTER_LOAD[fullname])
                return spec
        return None


def install() -> None:
    """Apply each addition now where lm-eval's module is already imported, else later."""
    for name, targets in AFTER_LOAD.items():
        if name in sys.modules:
            _call(targets, sys.modules[name])
    if not any(isinstance(f, _LmEvalFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LmEvalFinder())


install()
