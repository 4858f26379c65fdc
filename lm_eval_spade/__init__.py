"""Early-exit evaluation for lm-evaluation-harness: SPADE decoders as `--model spade-exit`.

Importing the package registers `spade-exit` with lm-eval (lazily: the model module and
torch load only when the name is used). An installed package does this at interpreter
start too, through `lm_eval_spade.pth`, so the `lm_eval` command needs no wrapper.
"""

from importlib.metadata import PackageNotFoundError, version

from lm_eval_spade._startup import hook as _hook

try:
    __version__ = version("lm-eval-spade")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

_hook.install()

__all__ = ["__version__"]
