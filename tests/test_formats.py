"""Loaders of the real datasets, on tiny fixture files written in their exact official formats."""

import json

import numpy as np
import pytest
from PIL import Image

from cdcca.data.formats import load_aokvqa, load_coco_captions, load_nocaps, load_vqav2
from cdcca.metrics import aokvqa_mc_accuracy, vqa_accuracy


def _write(path, payload):
    path.write_text(json.dumps(payload))
    return path


def _jpeg(path, colour):
    Image.fromarray(np.full((8, 10, 3), colour, np.uint8)).save(path)


def test_vqav2_questions_and_annotations(tmp_path):
    questions = _write(
        tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "license": {},
            "questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 420}],
        },
    )
    answers = [
        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
        for i, a in enumerate(["red"] * 8 + ["dark red", "maroon"])
    ]
    annotations = _write(
        tmp_path / "v2_mscoco_val2014_annotations.json",
        {
            "info": {},
            "license": {},
            "data_subtype": "val2014",
            "data_type": "mscoco",
            "annotations": [
                {
                    "question_type": "what color is the",
                    "multiple_choice_answer": "red",
                    "answers": answers,
                    "image_id": 42,
                    "answer_type": "other",
                    "question_id": 420,
                }
            ],
        },
    )
    _jpeg(tmp_path / "COCO_val2014_000000000042.jpg", (200, 0, 0))

    samples = load_vqav2(questions, annotations, tmp_path)

    (sample,) = samples
    assert sample.task == "vqa" and sample.domain == "vqav2" and sample.target == "red"
    assert sample.prompt == "Question: What color is the bus? Answer:"
    assert len(sample.answers) == 10 and vqa_accuracy("Red", sample.answers) == 1.0
    assert sample.load_image().shape == (8, 10, 3)


def test_aokvqa_gives_mc_and_direct_answer_samples(tmp_path):
    records = [
        {
            "split": "val",
            "image_id": 7,
            "question_id": "22MexNkBPpdZGX6sxbxVBH",
            "question": "What is the man by the bags awaiting?",
            "choices": ["skateboarder", "train", "delivery", "cab"],
            "correct_choice_idx": 3,
            "direct_answers": [
                "ride",
                "ride",
                "bus",
                "taxi",
                "travelling",
                "traffic",
                "taxi",
                "cab",
                "cab",
                "his ride",
            ],
            "difficult_direct_answer": False,
            "rationales": ["A train would not be on the street."],
        },
        {
            "split": "test",
            "image_id": 8,
            "question_id": "hidden",
            "question": "Why?",
            "choices": ["a", "b", "c", "d"],
            "difficult_direct_answer": False,
        },
    ]
    path = _write(tmp_path / "aokvqa_v1p0_val.json", records)

    samples = load_aokvqa(path, tmp_path)

    mc, da = samples  # the test-split record hides answers and yields nothing to score
    assert (
        mc.task == "mc"
        and mc.choices[mc.correct_idx] == "cab"
        and aokvqa_mc_accuracy("cab", mc.choices, mc.correct_idx) == 1.0
    )
    assert "Choices: skateboarder, train, delivery, cab." in mc.prompt
    assert da.task == "vqa" and da.target in ("ride", "taxi", "cab") and len(da.answers) == 10
    assert mc.image_path.endswith("000000000007.jpg")


def test_coco_captions_group_references_per_image(tmp_path):
    path = _write(
        tmp_path / "captions_val2017.json",
        {
            "info": {},
            "licenses": [],
            "images": [
                {"id": 1, "file_name": "000000000001.jpg", "height": 8, "width": 10},
                {"id": 2, "file_name": "000000000002.jpg", "height": 8, "width": 10},
            ],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "A dog on grass. "},
                {"image_id": 1, "id": 11, "caption": "A brown dog."},
                {"image_id": 2, "id": 12, "caption": "Two cats."},
            ],
        },
    )

    samples = load_coco_captions(path, tmp_path)

    assert [s.references for s in samples] == [["A dog on grass.", "A brown dog."], ["Two cats."]]
    assert {s.task for s in samples} == {"caption"} and {s.domain for s in samples} == {"coco"}


def test_nocaps_keeps_per_image_domain(tmp_path):
    path = _write(
        tmp_path / "nocaps_val_4500_captions.json",
        {
            "licenses": [],
            "info": {},
            "images": [
                {
                    "id": 0,
                    "open_images_id": "0013ea2087020901",
                    "file_name": "0013ea2087020901.jpg",
                    "height": 8,
                    "width": 10,
                    "domain": "in-domain",
                },
                {
                    "id": 1,
                    "open_images_id": "0017eabf4ff1fd55",
                    "file_name": "0017eabf4ff1fd55.jpg",
                    "height": 8,
                    "width": 10,
                    "domain": "out-domain",
                },
            ],
            "annotations": [
                {"image_id": 0, "id": 0, "caption": "A baby in a crib."},
                {"image_id": 1, "id": 1, "caption": "A jellyfish."},
            ],
        },
    )

    samples = load_nocaps(path, tmp_path)

    assert [s.domain for s in samples] == ["in-domain", "out-domain"]
    with pytest.raises(FileNotFoundError, match="images directory"):
        samples[0].load_image()


def test_loaders_explain_wrong_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco_captions(tmp_path / "nope.json", tmp_path)
    wrong = _write(tmp_path / "wrong.json", {"questions": []})
    with pytest.raises(ValueError, match="'images' and 'annotations'"):
        load_nocaps(wrong, tmp_path)
    with pytest.raises(ValueError, match="JSON list"):
        load_aokvqa(wrong, tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_vqav2(broken, broken, tmp_path)
