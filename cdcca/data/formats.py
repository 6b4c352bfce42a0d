"""Loaders for the real benchmarks of the paper, read from local files in their official JSON formats.

* VQAv2 (Goyal et al. 2017): ``v2_OpenEnded_mscoco_<split>_questions.json`` (``{"questions": [{image_id,
  question, question_id}]}``) + ``v2_mscoco_<split>_annotations.json`` (``{"annotations": [{question_id,
  image_id, answers: [{answer, answer_confidence, answer_id}], multiple_choice_answer, ...}]}``); images
  ``COCO_<split>_<image_id:012d>.jpg``.
* A-OKVQA (Schwenk et al. 2022): ``aokvqa_v1p0_<split>.json``, a list of ``{question_id, image_id, question,
  choices, correct_choice_idx, direct_answers, ...}``; COCO 2017 images ``<image_id:012d>.jpg``. Each
  question yields an ``mc`` and a ``vqa`` (direct answer) sample.
* COCO Captions 2017 (Chen et al. 2015): ``captions_<split>2017.json`` (``{"images": [{id, file_name}],
  "annotations": [{image_id, id, caption}]}``).
* nocaps (Agrawal et al. 2019): ``nocaps_<split>_4500_captions.json``, COCO-style with an extra
  ``domain`` per image (``in-domain``, ``near-domain``, ``out-domain``), kept as the sample's domain.

Images are read lazily from ``images_dir`` when a sample's image is first needed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from cdcca.data.sample import Sample

VQA_PROMPT = "Question: {question} Answer:"  # BLIP-2's VQA prompt
CAPTION_PROMPT = "a photo of"  # BLIP-2's captioning prefix


def _read_json(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; download the dataset's annotation file and pass its path")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _require(record: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"{where}: record is missing {missing}; is this the right file for this loader?")


def load_vqav2(
    questions_file: str | Path,
    annotations_file: str | Path,
    images_dir: str | Path,
    split: str = "val2014",
    domain: str = "vqav2",
    prompt: str = VQA_PROMPT,
) -> list[Sample]:
    """VQAv2 open-ended questions with their 10 annotator answers as ``vqa`` samples."""
    questions = _read_json(questions_file)
    annotations = _read_json(annotations_file)
    if "questions" not in questions or "annotations" not in annotations:
        raise ValueError("VQAv2 files need a top-level 'questions' list and an 'annotations' list")
    by_question = {}
    for annotation in annotations["annotations"]:
        _require(annotation, ("question_id", "answers"), str(annotations_file))
        by_question[annotation["question_id"]] = annotation
    samples = []
    for question in questions["questions"]:
        _require(question, ("question_id", "image_id", "question"), str(questions_file))
        annotation = by_question.get(question["question_id"])
        if annotation is None:
            raise ValueError(f"question {question['question_id']} has no annotation in {annotations_file}")
        answers = [a["answer"] for a in annotation["answers"]]
        samples.append(
            Sample(
                sample_id=f"{domain}/{question['question_id']}",
                domain=domain,
                task="vqa",
                prompt=prompt.format(question=question["question"]),
                image_path=str(Path(images_dir) / f"COCO_{split}_{question['image_id']:012d}.jpg"),
                answers=answers,
                target=annotation.get("multiple_choice_answer", answers[0]),
            )
        )
    return samples


def load_aokvqa(
    annotations_file: str | Path, images_dir: str | Path, domain: str = "aokvqa", prompt: str = VQA_PROMPT
) -> list[Sample]:
    """A-OKVQA questions: one ``mc`` sample (choices listed in the prompt) and one direct-answer ``vqa`` sample each."""
    records = _read_json(annotations_file)
    if not isinstance(records, list):
        raise ValueError(f"{annotations_file}: A-OKVQA annotations are a JSON list of questions")
    samples = []
    for record in records:
        _require(record, ("question_id", "image_id", "question", "choices"), str(annotations_file))
        image_path = str(Path(images_dir) / f"{record['image_id']:012d}.jpg")
        direct = list(record.get("direct_answers", []))
        correct = record.get("correct_choice_idx")
        if correct is not None:  # the test split hides the answers
            choices = list(record["choices"])
            mc_prompt = prompt.format(question=f"{record['question']} Choices: {', '.join(choices)}.")
            samples.append(
                Sample(
                    f"{domain}/{record['question_id']}/mc",
                    domain,
                    "mc",
                    mc_prompt,
                    image_path=image_path,
                    choices=choices,
                    correct_idx=int(correct),
                    answers=direct,
                    target=choices[int(correct)],
                )
            )
        if direct:
            samples.append(
                Sample(
                    f"{domain}/{record['question_id']}/da",
                    domain,
                    "vqa",
                    prompt.format(question=record["question"]),
                    image_path=image_path,
                    answers=direct,
                    target=max(set(direct), key=direct.count),
                )
            )
    return samples


def _load_coco_style(annotations_file, images_dir, domain: str, prompt: str, per_image_domain: bool) -> list[Sample]:
    data = _read_json(annotations_file)
    if "images" not in data or "annotations" not in data:
        raise ValueError(f"{annotations_file}: COCO-style caption files need 'images' and 'annotations' lists")
    references: dict[int, list[str]] = defaultdict(list)
    for annotation in data["annotations"]:
        _require(annotation, ("image_id", "caption"), str(annotations_file))
        references[annotation["image_id"]].append(annotation["caption"].strip())
    samples = []
    for image in data["images"]:
        _require(image, ("id", "file_name"), str(annotations_file))
        refs = references.get(image["id"], [])
        image_domain = image.get("domain", domain) if per_image_domain else domain
        samples.append(
            Sample(
                f"{domain}/{image['id']}",
                image_domain,
                "caption",
                prompt,
                image_path=str(Path(images_dir) / image["file_name"]),
                references=refs,
                target=refs[0] if refs else "",
            )
        )
    return samples


def load_coco_captions(
    annotations_file: str | Path, images_dir: str | Path, prompt: str = CAPTION_PROMPT
) -> list[Sample]:
    """COCO Captions 2017: one ``caption`` sample per image with its (usually 5) references."""
    return _load_coco_style(annotations_file, images_dir, "coco", prompt, per_image_domain=False)


def load_nocaps(annotations_file: str | Path, images_dir: str | Path, prompt: str = CAPTION_PROMPT) -> list[Sample]:
    """nocaps: one ``caption`` sample per image; ``domain`` is the image's in/near/out-domain label."""
    return _load_coco_style(annotations_file, images_dir, "nocaps", prompt, per_image_domain=True)
