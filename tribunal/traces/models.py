"""Load a causal LM and find its decoder blocks: the one place that knows each family's layout."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..config import parse_index_list
from ..errors import TribunalError

EMBEDDED_MODEL = Path(__file__).resolve().parents[1] / "embedded" / "model"
EMBEDDED_MODEL_ID = "tribunal/embedded-default"  # the model_id stores record for it

# Where each family keeps its decoder blocks (attribute path from the *ForCausalLM object).
DECODER_BLOCKS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "olmo": "model.layers",
    "granite": "model.layers",
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_bigcode": "transformer.h",
    "gpt_neo": "transformer.h",
    "bloom": "transformer.h",
    "falcon": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "mpt": "transformer.blocks",
}
_FALLBACK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.blocks",
                   "model.language_model.layers")

# The study read layers at about these fractions of a 28-layer model's depth (12, 16, 20).
SEED_LAYER_FRACTIONS = (12 / 28, 16 / 28, 20 / 28)


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def decoder_blocks(model):
    """The ModuleList of decoder blocks; the residual stream leaving block i is layer i."""
    model_type = getattr(model.config, "model_type", "")
    paths = [DECODER_BLOCKS[model_type]] if model_type in DECODER_BLOCKS else []
    for path in paths + [p for p in _FALLBACK_PATHS if p not in paths]:
        try:
            blocks = _get(model, path)
        except AttributeError:
            continue
        if hasattr(blocks, "__len__") and len(blocks) > 0:
            return blocks
    raise TribunalError(
        f"cannot find the decoder blocks of model type {model_type!r}; add its path to DECODER_BLOCKS in "
        "tribunal/traces/models.py"
    )


def default_layers(depth: int) -> list[int]:
    """The study's middle layers, scaled to this model's depth."""
    return sorted({min(depth - 1, max(0, round(depth * f))) for f in SEED_LAYER_FRACTIONS})


def resolve_layers(spec, depth: int) -> list[int]:
    """'all', None (the default), '4,8,12-15' or a list -> sorted layer indices, checked against depth."""
    if spec is None or spec == "" or spec == "default":
        return default_layers(depth)
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(depth))
        try:
            layers = parse_index_list(spec)
        except ValueError:
            raise TribunalError(f"--layers {spec!r}: use a comma list and ranges like 4,8,12-15, or 'all'") from None
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 0 <= x < depth]
    if bad:
        raise TribunalError(f"layer(s) {bad} out of range: the model has {depth} decoder layers (0..{depth - 1})")
    return sorted(set(layers))


_KEPT: dict | None = None  # inside keep_loaded(): the arguments of load_model -> (model, tokenizer)


@contextmanager
def keep_loaded():
    """Within this block, load_model returns the model it already loaded for the same arguments (and the same
    local files): `tribunal steer` samples many arms of one model with one load. Leaving it drops them."""
    global _KEPT
    outer, _KEPT = _KEPT, {} if _KEPT is None else _KEPT
    try:
        yield
    finally:
        _KEPT = outer


def load_model(model_id: str | None = None, *, revision: str | None = None, compute_dtype: str = "auto",
               device_map: str | None = None, trust_remote_code: bool = False, weights: bool = True):
    """(model, tokenizer) through AutoModelForCausalLM / AutoTokenizer, on CPU, one GPU or many (device_map).
    weights=False: the model's structure on the meta device, no weights read or placed (for a run whose
    activations vLLM computes: its config, dtype, layers and identity are all the run needs of it)."""
    if _KEPT is None:
        return _load_model(model_id, revision, compute_dtype, device_map, trust_remote_code, weights)
    path = Path(str(model_id or EMBEDDED_MODEL))
    key = (str(model_id), revision, compute_dtype, str(device_map), trust_remote_code, weights,
           local_fingerprint(path) if path.is_dir() else None)
    if key not in _KEPT:
        _KEPT.clear()  # one model held at a time
        _KEPT[key] = _load_model(model_id, revision, compute_dtype, device_map, trust_remote_code, weights)
    return _KEPT[key]


def _load_model(model_id, revision, compute_dtype, device_map, trust_remote_code, weights=True):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    model_id = str(model_id or EMBEDDED_MODEL)
    if device_map in (None, "", "none"):
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    elif device_map.strip().startswith("{"):
        device_map = json.loads(device_map)
    elif Path(device_map).suffix == ".json" and Path(device_map).exists():
        device_map = json.loads(Path(device_map).read_text())
    on_gpu = (device_map != "cpu") and torch.cuda.is_available()
    if compute_dtype == "auto":
        dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else (torch.float16 if on_gpu else torch.float32)
    else:
        dtype = getattr(torch, compute_dtype)
    local = Path(model_id).exists()
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if local:
        kwargs.pop("revision")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id, **kwargs)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, device_map=device_map, **kwargs)
        else:
            model = _structure(model_id, dtype, kwargs)
    except OSError as exc:
        where = "local path" if local else "Hugging Face id (no network? set HF_HUB_OFFLINE=1 and use a local path)"
        raise TribunalError(f"cannot load model {model_id!r} as a {where}: {str(exc).splitlines()[0]}") from None
    except ValueError as exc:
        raise TribunalError(f"cannot load model {model_id!r}: {str(exc).splitlines()[0]}") from None
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def _structure(model_id: str, dtype, kwargs):
    """The model built from its config on the meta device, with its generation config (stop tokens)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_id, **kwargs)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=kwargs.get("trust_remote_code", False))
    try:
        model.generation_config = GenerationConfig.from_pretrained(model_id, **kwargs)
    except OSError:  # no generation_config.json: the one from_config derived stands
        pass
    return model


def model_identity(model, model_id: str | None) -> tuple[str, str]:
    """(model_id, model_revision) a store records and a resume must match.

    A hub model is its id and the commit the hub resolved. A local model is its resolved path and a
    fingerprint of its content (config.json, and each weight file's name, size and sampled bytes), so
    `models/m`, `./models/m` and `/abs/models/m` are one model, and a requeued task whose working
    directory or copy of the model differs still resumes when the content is the same.
    """
    recorded = recorded_model_id(model_id)
    if model_id is None:
        return recorded, "embedded"
    if Path(str(model_id)).exists():
        return recorded, local_fingerprint(Path(str(model_id)))
    return recorded, str(getattr(model.config, "_commit_hash", None) or "unknown")


def recorded_model_id(model_id: str | None) -> str:
    """The model_id a store (and a probes folder) records for `--model model_id`, known before the model loads."""
    if model_id is None:
        return EMBEDDED_MODEL_ID
    path = Path(str(model_id))
    return str(path.resolve()) if path.exists() else str(model_id)


def local_fingerprint(path: Path, sample_bytes: int = 1 << 20) -> str:
    """'local:<sha256 prefix>' of a model folder's config and weights; reads at most 3 MiB of each weight
    file (its start, middle and end), so a 15 GB checkpoint is fingerprinted in milliseconds."""
    import hashlib

    digest = hashlib.sha256()
    path = Path(path)
    config = path / "config.json"
    if config.exists():
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    weights = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf"))
    for weight in weights:
        size = weight.stat().st_size
        digest.update(f"{weight.name}:{size}".encode())
        with open(weight, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - sample_bytes // 2), max(0, size - sample_bytes)}):
                fh.seek(offset)
                digest.update(fh.read(sample_bytes))
    return "local:" + digest.hexdigest()[:16]


def _tokenizer_source(model_id: str, tokenizer: str | None) -> str | None:
    """Where the store's tokenizer loads from: `tokenizer` when given, else the embedded model or the store's model
    when it is a local path; None for a hub id (no network lookups unless asked with --tokenizer)."""
    source = tokenizer or (str(EMBEDDED_MODEL) if model_id == EMBEDDED_MODEL_ID else model_id)
    return source if tokenizer is not None or Path(source).exists() else None


def piece_decoder(model_id: str, tokenizer: str | None = None):
    """decode(token_ids) -> each token decoded alone, with .prefix(token_ids, n) -> the first n decoded together:
    what the chunk probe needs to find a chunk's last token. The store's model's tokenizer (the embedded one,
    a local path, or `tokenizer` given explicitly); synthetic stores spell one character per token."""
    from .synthetic import SYNTH_MODEL_ID

    if tokenizer is None and model_id == SYNTH_MODEL_ID:
        def chars(ids):
            return [chr(int(i)) for i in ids]

        chars.prefix = lambda ids, n: "".join(chr(int(i)) for i in ids[:n])
        return chars
    source = _tokenizer_source(model_id, tokenizer)
    if source is None:
        raise TribunalError(f"the store's model {model_id!r} is not on this machine: give its tokenizer with --tokenizer "
                            "(a local path, or a hub id where the network allows)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise TribunalError(f"cannot load tokenizer {source!r}: {str(exc).splitlines()[0]}") from None

    def pieces(ids):
        return [tok.decode([int(i)], skip_special_tokens=False) for i in ids]

    pieces.prefix = lambda ids, n: tok.decode([int(i) for i in ids[:n]], skip_special_tokens=False)
    return pieces


def token_decoder(model_id: str, tokenizer: str | None = None):
    """token id -> its text (what `tribunal inspect --trace` prints beside each token), from piece_decoder's
    tokenizer; None where the store's model is a hub id and no tokenizer is given (inspect makes no network
    lookups unless asked)."""
    from .synthetic import SYNTH_MODEL_ID

    if tokenizer is None and model_id != SYNTH_MODEL_ID and _tokenizer_source(model_id, tokenizer) is None:
        return None
    pieces = piece_decoder(model_id, tokenizer)
    return lambda token_id: pieces([token_id])[0]
