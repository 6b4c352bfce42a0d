"""Build, save and load models. A checkpoint is a directory, loadable with no network:

``config.json`` + ``model.safetensors`` (``Blip2ForConditionalGeneration.save_pretrained``), the tokenizer
files (``tokenizer.json`` ...), and ``cdcca.json`` (image preprocessing and provenance). A real BLIP-2
checkpoint directory (e.g. a local copy of ``Salesforce/blip2-opt-2.7b``) loads too: its
``preprocessor_config.json`` gives the image spec. Hub ids are refused with instructions, never fetched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration
from transformers.utils import logging as hf_logging

from cdcca.errors import CheckpointError, ModelNotFoundError
from cdcca.models.mllm import MLLM, ImageSpec
from cdcca.models.presets import Preset

hf_logging.disable_progress_bar()  # our own bars say what is happening; per-shard bars are noise

META_FILE = "cdcca.json"
FORMAT_VERSION = 1


def build_pair(preset: Preset, tokenizer, seed: int = 0) -> tuple[MLLM, MLLM]:
    """Freshly initialised teacher and student of ``preset`` that share one vision encoder module."""
    torch.manual_seed(seed)
    spec = ImageSpec(size=preset.image_size)
    teacher = MLLM(
        Blip2ForConditionalGeneration(preset.blip2_config("teacher", tokenizer)),
        tokenizer,
        spec,
        {"role": "teacher", "preset": preset.name},
    )
    student = MLLM(
        Blip2ForConditionalGeneration(preset.blip2_config("student", tokenizer)),
        tokenizer,
        spec,
        {"role": "student", "preset": preset.name},
    )
    for model in (teacher, student):
        # transformers zero-initialises the queries (fine when loading weights); identical queries would stay
        # identical under training, so break the symmetry as BLIP-2's own code does: N(0, 0.02)
        torch.nn.init.normal_(model.blip2.query_tokens, std=0.02)
    share_vision_encoder(teacher, student, check=False)
    return teacher, student


def share_vision_encoder(teacher: MLLM, student: MLLM, check: bool = True) -> None:
    """Make the student use the teacher's vision encoder module (frozen), as the paper's pair does.

    With ``check`` the two encoders must already hold identical weights (two checkpoints of one pair).
    """
    if check:
        theirs = teacher.blip2.vision_model.state_dict()
        for name, tensor in student.blip2.vision_model.state_dict().items():
            if name not in theirs or not torch.equal(theirs[name], tensor):
                raise CheckpointError(
                    f"teacher and student vision encoders differ at {name!r}: they must come from the same "
                    "`cdcca pretrain` run (the student is trained on the teacher's frozen encoder)"
                )
    student.blip2.vision_model = teacher.blip2.vision_model
    teacher.blip2.vision_model.requires_grad_(False)


def save_mllm(model: MLLM, directory: str | Path) -> Path:
    """Write ``model`` as a self-contained checkpoint directory; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.blip2.save_pretrained(directory, safe_serialization=True)
    model.tokenizer.save_pretrained(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        "image_spec": {"size": model.image_spec.size, "mean": model.image_spec.mean, "std": model.image_spec.std},
        "meta": model.meta,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def _missing_model_message(path: str) -> str:
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    hint = (
        f"{path!r} looks like a model hub id; CD-CCA never downloads at run time. On a machine with network "
        f"access run `huggingface-cli download {path} --local-dir DIR`, copy DIR here and pass DIR instead."
        if looks_like_hub_id
        else f"no model directory at {path!r}. Run `cdcca pretrain` to build the embedded models, or pass the "
        "path of a local checkpoint directory (config.json + *.safetensors + tokenizer files)."
    )
    return hint


REBUILD_HINT = (
    "rebuild it with `cdcca pretrain` (the --preset/--out it was built with) or point --model at a good model folder"
)


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file; a damaged one is a CheckpointError naming it (issue 17: the file, what to do)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is damaged or unreadable ({err}); {REBUILD_HINT}") from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds JSON but not an object; {REBUILD_HINT}")
    return value


def _weight_files(directory: Path) -> str:
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    return ", ".join(str(f) for f in files) or f"the weights in {directory}"


def load_mllm(path: str | Path, device: str | torch.device = "cpu") -> MLLM:
    """Load a CD-CCA checkpoint or a real BLIP-2 checkpoint directory, strictly from local files.

    Every way a folder can be unusable (missing, not a model, a truncated weights file, broken JSON, a broken
    tokenizer) is a :class:`~cdcca.errors.CdccaError` that names the file and says how to rebuild it.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ModelNotFoundError(_missing_model_message(str(path)))
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(
            f"{directory} has no config.json, so it is not a model directory. Run `cdcca pretrain` or point at a "
            "directory written by `save_pretrained` (config.json + *.safetensors + tokenizer files)."
        )
    config = _read_json(directory / "config.json")
    if config.get("model_type") != "blip-2":
        raise CheckpointError(f"{directory} holds a {config.get('model_type')!r} model; CD-CCA needs BLIP-2")
    try:
        blip2 = Blip2ForConditionalGeneration.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # safetensors, torch and transformers each raise their own types for a bad file
        raise CheckpointError(
            f"cannot load the model weights {_weight_files(directory)}: {_first_line(err)}; the file is damaged or "
            f"incomplete (a copy cut short?); {REBUILD_HINT}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load the tokenizer in {directory} (tokenizer.json, tokenizer_config.json): {_first_line(err)}; "
            f"{REBUILD_HINT}"
        ) from err
    if (directory / META_FILE).is_file():
        stored = _read_json(directory / META_FILE)
        if stored.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{directory / META_FILE} has format {stored.get('format_version')}, this CD-CCA reads {FORMAT_VERSION}"
            )
        try:
            spec = stored["image_spec"]
            image_spec = ImageSpec(spec["size"], tuple(spec["mean"]), tuple(spec["std"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{directory / META_FILE} has no valid image_spec ({err}); {REBUILD_HINT}") from err
        meta = stored.get("meta", {})
    else:  # a real BLIP-2 directory: preprocessing from its image processor config
        image_spec, meta = _image_spec_from_processor(directory, blip2), {"role": "external", "source": str(directory)}
    blip2.eval()
    return MLLM(blip2, tokenizer, image_spec, meta).to(device)


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _image_spec_from_processor(directory: Path, blip2: Blip2ForConditionalGeneration) -> ImageSpec:
    size = blip2.config.vision_config.image_size
    processor_file = directory / "preprocessor_config.json"
    if not processor_file.is_file():
        return ImageSpec(size=size)
    processor = _read_json(processor_file)
    return ImageSpec(
        size=size,
        mean=tuple(processor.get("image_mean", (0.5, 0.5, 0.5))),
        std=tuple(processor.get("image_std", (0.5, 0.5, 0.5))),
    )


def load_adaptable_student(checkpoints: str | Path) -> MLLM:
    """The robots' student from ``checkpoints/student`` with LoRA injected: version 0 of every adapter chain.

    Cloud and robot both build it with this function, so they start from the same θ_base (the seeded LoRA
    initialisation of :class:`~cdcca.models.trainable.LoraSettings`).
    """
    from cdcca.models.trainable import add_lora

    return add_lora(load_mllm(Path(checkpoints) / "student"))
