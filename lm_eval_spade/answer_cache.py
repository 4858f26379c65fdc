"""`lm_eval --use_cache` with spade-exit: one cache per setting, exits kept with answers.

lm-eval's `CachingLM` keys a cached answer by the request alone, so two runs with another
`exit_layer` or `threshold` on one cache file would share answers, and the second run's
results JSON would count no exits. The startup hook (`_startup/hook.py`) wraps
`CachingLM` (`install`) so that, for spade-exit:

- the cache file's name carries a digest of everything that changes an answer
  (`identity`): the spade settings, the model (its resolved folder and the size and time
  of its files, or its hub revision), the LoRA adapter and lens (their weights' SHA-256),
  the other model_args (`max_length`, `add_bos_token`, `dtype`, ...) and this package's
  version. `--use_cache results` gives `results_rank0.spade-<digest>.db`; runs with the
  same settings share it, runs with any other setting never do;
- each computed request's exit record is stored beside its answer and recorded again
  when the answer comes from the cache, so `config.spade.tasks` counts every request.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: model_args that never change an answer (where and how fast it is computed, logs).
NEUTRAL_ARGS = frozenset({"batch_size", "max_batch_size", "device", "exit_log", "parallelize"})
EXIT_KEY = "spade-exit:"
SCORED = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def _files_digest(folder: Path, contents: bool) -> list[Any]:
    """A folder's files by name with their SHA-256 (`contents`) or size and time."""
    out: list[Any] = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if contents:
            out.append([path.name, hashlib.sha256(path.read_bytes()).hexdigest()])
        else:
            stat = path.stat()
            out.append([path.name, stat.st_size, stat.st_mtime_ns])
    return out


def _weights_digest(module: Any) -> str:
    """SHA-256 of a model object's parameters (a model passed in, not a path)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _where(value: Any, contents: bool) -> Any:
    """A local folder's resolved path and files, a model object's weights; anything
    else as given."""
    if isinstance(value, str | Path) and Path(value).is_dir():
        folder = Path(value).resolve()
        return [str(folder), _files_digest(folder, contents)]
    if hasattr(value, "state_dict"):
        return ["model object", _weights_digest(value)]
    return value


def identity(lm: Any, model_args: dict[str, Any]) -> str:
    """A digest of what decides a spade-exit LM's answers (see the module doc)."""
    from lm_eval_spade import __version__

    args = {k: v for k, v in model_args.items() if k not in NEUTRAL_ARGS}
    record = {
        "package_version": __version__,
        "spade": lm.spade.to_dict(),
        "model_args": {k: _where(v, k == "peft") for k, v in sorted(args.items())},
        "model_commit": getattr(lm.model.config, "_commit_hash", None),
    }
    if lm.lens is not None:
        digest = hashlib.sha256()
        for name, tensor in sorted(lm.lens.state_tensors().items()):
            digest.update(name.encode() + tensor.numpy().tobytes())
        record["lens_weights"] = digest.hexdigest()
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_db: str, digest: str) -> str:
    """`results_rank0.db` -> `results_rank0.spade-<digest>.db`."""
    stem = cache_db[: -len(".db")] if cache_db.endswith(".db") else cache_db
    return f"{stem}.spade-{digest}.db"


def exit_key(request_type: str, args: Any) -> str:
    from lm_eval.api.model import hash_args

    return EXIT_KEY + hash_args(request_type, args)


def store_exits(dbdict: Any, requests: list[Any], records: list[dict[str, Any]]) -> None:
    """Keep each computed request's exit record beside its cached answer."""
    if dbdict is None:
        return
    for req, record in zip(requests, records, strict=True):
        dbdict[exit_key(req.request_type, req.args)] = record
    dbdict.commit()


def stored_exits(dbdict: Any, requests: list[Any]) -> list[dict[str, Any] | None]:
    return [dbdict.get(exit_key(req.request_type, req.args)) for req in requests]


def _served_from_cache(caching_lm: Any, attr: str, requests: list[Any]) -> list[Any]:
    """The requests `CachingLM` answers from its cache, by its own rule."""
    from lm_eval.api.model import hash_args

    return [
        req
        for req in requests
        if not (attr == "generate_until" and req.args[1].get("do_sample", False))
        and hash_args(attr, req.args) in caching_lm.dbdict
    ]


def install(model_module: Any) -> None:
    """Wrap lm-eval's `CachingLM` as the module doc says (for LMs that ask for it)."""
    cls = model_module.CachingLM
    if getattr(cls.__init__, "_spade_cache", False):
        return
    original_init, original_getattr = cls.__init__, cls.__getattr__

    @functools.wraps(original_init)
    def __init__(self: Any, lm: Any, cache_db: str) -> None:
        name = getattr(lm, "answer_cache_identity", None)
        if callable(name):
            cache_db = cache_path(cache_db, name())
            logger.info("spade-exit: cached answers for these settings live in %s", cache_db)
        original_init(self, lm, cache_db)

    def __getattr__(self: Any, attr: str) -> Any:
        answer = original_getattr(self, attr)
        restore = getattr(self.lm, "restore_cached_exits", None)
        if attr not in SCORED or restore is None:
            return answer

        def run(requests: list[Any]) -> list[Any]:
            cached = _served_from_cache(self, attr, requests)
            results = answer(requests)
            restore(cached, self.dbdict)
            return results

        return run

    __init__._spade_cache = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
