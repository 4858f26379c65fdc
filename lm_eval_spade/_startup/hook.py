"""Make `--model spade-exit` work in lm-eval without a wrapper script.

lm-eval 0.4.13 has no plugin discovery for models, and `get_model` imports its built-in
models only while its registry is empty. A package that registers itself therefore has to
register the built-ins too, or `--model hf` stops resolving.

The wheel installs `lm_eval_spade.pth` into site-packages, which imports this module at
interpreter start. It imports nothing heavy: it only adds a finder that waits for
`lm_eval.api.registry` to be imported, and once that module has run, registers
`spade-exit` lazily (the model module, and so torch, loads only when the name is used)
next to lm-eval's own lazy entries.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

REGISTRY_MODULE = "lm_eval.api.registry"
MODEL_NAME = "spade-exit"
MODEL_TARGET = "lm_eval_spade.model:SpadeExitLM"


def register(registry_module: ModuleType) -> None:
    """Register `spade-exit` and lm-eval's built-in models in lm-eval's model registry."""
    registry = registry_module.model_registry
    if isinstance(getattr(registry, "_objs", None), dict) and MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_TARGET)
    # Our entry makes the registry non-empty, which stops `get_model` from importing the
    # built-ins on its own; importing `lm_eval.models` registers them (lazily, cheaply).
    import lm_eval.models  # noqa: F401


class _RegisterAfterLoad(importlib.abc.Loader):
    """Wraps the real loader of `lm_eval.api.registry` and registers once it has run."""

    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._wrapped.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._wrapped.exec_module(module)
        register(module)


class _RegistryFinder(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.api.registry` through the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[override]
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Register now if lm-eval's registry is already imported, else when it is."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
    elif not any(isinstance(f, _RegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


install()
