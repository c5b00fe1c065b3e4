"""Loading the caption head's language model and tokenizer: by hub name, local folder or GGUF file,
local copies first, the hub only when it may be asked, and every failure as one line naming the
parameter to change.

Nothing here imports transformers at module level: `offline()` is read by stages that never load a model.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from clipposter.errors import ClipposterError, ConfigError, cause_line
from clipposter.heads.caption.config import DEFAULT_LM

__all__ = ["offline", "first_line", "quiet_transformers", "is_gguf", "load_language_model", "max_positions"]

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """True when HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE says the hub must not be asked."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def first_line(exc: BaseException) -> str:
    """An exception as one short line (libraries raise multi-line messages; ours are one line)."""
    return cause_line(exc)


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' per-file progress bars (a checkpoint per epoch would print two each) and
    its notes that repetition/n-gram rules skip the prompt: our prompt is vectors, not tokens."""
    import warnings

    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Passing `(repetition_penalty|no_repeat_ngram_size)` with "
                                                      r"`inputs_embeds`")
            yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# A lower-case ASCII text every byte-level or word-piece tokenizer of a causal LM encodes and decodes back.
_PROBE_TEXT = "a poster"


def _tokenizer_problem(tok) -> str | None:
    """Why a loaded tokenizer cannot be the one its files describe, or None.

    transformers 5 answers a local-only load whose HF cache holds the model's config.json but no
    tokenizer files with an empty tokenizer (one entry, every text encodes to []) instead of
    raising; a tokenizer must encode a known text to tokens that decode back to it."""
    try:
        ids = tok.encode(_PROBE_TEXT, add_special_tokens=False)
        back = tok.decode(ids, skip_special_tokens=True) if ids else ""
    except Exception as exc:  # a broken tokenizer file fails in many ways; all mean "unusable"
        return f"it cannot encode text ({first_line(exc)})"
    if not ids:
        return f"it encodes {_PROBE_TEXT!r} to no tokens ({len(tok)} entries: its vocabulary files are missing)"
    if back.strip() != _PROBE_TEXT:
        return f"it encodes {_PROBE_TEXT!r} to tokens that decode to {back!r}"
    return None


def _model_problem(loaded) -> str | None:
    """Why a model loaded with output_loading_info cannot be the one asked for, or None: weights that
    were not in the files found would be random."""
    _, info = loaded
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        return f"{len(missing)} of its weights are not in the files found (first: {missing[0]})"
    return None


def _from_pretrained(loader, name: str, check=None, **kw):
    """Local folder → load it; a hub name → the local HF cache first, the hub only when `hub` and not offline.

    Trying the local cache first makes the common offline case fail (or succeed) in a second
    instead of after the hub client's retries. What a local-first load returns is checked with
    `check` (returns why it is unusable, or None): a cache holding some of a repository's files can
    load "successfully" into something empty, and then the hub must be asked for the rest."""
    hub = kw.pop("hub", True)

    def checked(result, where: str):
        problem = check(result) if check else None
        if problem:
            raise OSError(f"{where} {name} is incomplete: {problem}")
        return result

    if Path(name).expanduser().is_dir():
        return checked(loader(str(Path(name).expanduser()), **kw), "the folder")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        # Clearly a path (a hub id is NAME or ORG/NAME): do not ask the hub about it.
        raise OSError(f"no folder {name}")
    try:
        return checked(loader(name, local_files_only=True, **kw), "the local HF cache's copy of")
    except (OSError, ValueError):
        if offline() or not hub:
            raise
    return checked(loader(name, **kw), "the hub's copy of")


def is_gguf(name: str) -> bool:
    """Whether `name` names a GGUF file (one file holding the weights, config and tokenizer)."""
    return str(name).lower().endswith(".gguf")


def _gguf_model(path: Path):
    """The causal LM in a GGUF file, dequantised to a plain float32 model: trainable, and saved by
    `save_pretrained` as a normal folder (a model kept in GGUF blocks can do neither)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    kw: dict = {"dtype": torch.float32}
    # transformers >= 5 keeps GGUF blocks unless told to dequantise; an older one (without GgufConfig)
    # dequantises GGUF files on load by itself.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:
        kw["quantization_config"] = gguf_config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, output_loading_info=True, **kw)


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _load_gguf(field: str, name: str, loader, check):
    """Load what `loader` reads from the GGUF file `name`; every failure is one ConfigError naming `field`."""
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(field, f"{name!r}: no such file; point it at a .gguf file, a folder with config.json "
                                 f"and weights, or a hub name")
    try:
        import accelerate  # noqa: F401  transformers refuses GGUF files without it
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ConfigError(field, f"{name!r} is a GGUF file, which needs the {exc.name} package: "
                                 f"pip install 'clipposter[gguf]'") from None
    try:
        with quiet_transformers():
            result = loader(path)
    except Exception as exc:  # a truncated file, an architecture transformers cannot map: all "unusable"
        raise ConfigError(field, f"{name!r}: the GGUF file cannot be loaded ({first_line(exc)}); use a GGUF of "
                                 f"a causal LM architecture transformers reads (llama, mistral, qwen2, gpt2, ...)"
                          ) from None
    problem = check(result)
    if problem:
        raise ConfigError(field, f"{name!r}: the GGUF file is unusable: {problem}")
    return result


def _is_path(name: str) -> bool:
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def load_language_model(lm: str = DEFAULT_LM, tokenizer: str | None = None, hub: bool = True):
    """A Hugging Face causal LM and its tokenizer, by hub name, local folder or GGUF file.

    A GGUF file is dequantised to float32 and brings its own tokenizer (unless `tokenizer` is given).
    hub=False loads a hub name from the local HF cache only (the caller knows the hub is unreachable).
    An LM or tokenizer that cannot be loaded (no network, no such folder or file, not a causal LM) is a
    one-line ConfigError naming `lm` or `tokenizer`, saying what to point it at."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_gguf(lm):
        model, _ = _load_gguf("lm", lm, _gguf_model, _model_problem)
    else:
        try:
            with quiet_transformers():
                model, _ = _from_pretrained(AutoModelForCausalLM.from_pretrained, lm, _model_problem,
                                            output_loading_info=True, hub=hub)
        except Exception as exc:  # OSError, ValueError, HF validation errors: all mean "cannot load"
            if _is_path(lm):
                raise ConfigError("lm", f"{lm!r} cannot be loaded ({first_line(exc)}); point it at a folder with "
                                        f"config.json and weights, or at a .gguf file") from None
            where = "offline" if offline() or not hub else "from the local HF cache or the hub"
            raise ConfigError("lm", f"{lm!r} cannot be loaded {where} ({first_line(exc)}); point it at a local "
                                    f"folder with config.json and weights, or at a .gguf file") from None
    tok_source = tokenizer or lm
    if is_gguf(tok_source):
        tok = _load_gguf("tokenizer", tok_source, _gguf_tokenizer, _tokenizer_problem)
    else:
        try:
            tok = _from_pretrained(AutoTokenizer.from_pretrained, tok_source, _tokenizer_problem, hub=hub)
        except Exception as exc:
            raise ConfigError("tokenizer", f"{tok_source!r} cannot be loaded ({first_line(exc)}); point it at a "
                                           f"folder with tokenizer files (tokenizer.json or vocab.json + merges.txt)"
                              ) from None
    if tok.eos_token_id is None:
        raise ClipposterError(f"the tokenizer {tok_source!r} has no end-of-text token; captions could never "
                              f"stop. Use a tokenizer with eos_token set")
    vocab = model.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise ClipposterError(f"the tokenizer {tok_source!r} has {len(tok)} tokens but the language model "
                              f"{lm!r} only {vocab}; use the tokenizer the LM was trained with")
    return model, tok


def max_positions(lm) -> int | None:
    """How many positions (prefix + text) the LM can attend over, when its config says."""
    cfg = lm.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
