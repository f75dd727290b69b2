"""CocoDetectionDataset: targets contract, class mapping, repaired boxes, and every kind of bad input."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import numpy as np
import pytest
import torch
from coco_test_files import solid_image, write_coco_json, write_small_set
from PIL import Image
from torch.utils.data import DataLoader

from detr_lab.data.coco import CocoDetectionDataset
from detr_lab.data.collate import collate_detection
from detr_lab.data.errors import AnnotationWarning, CorruptImageError, DatasetError, MissingImageError


def _index_of(dataset: CocoDetectionDataset, image_id: int) -> int:
    return dataset.image_ids.tolist().index(image_id)


def test_targets_follow_the_contract(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations)
    assert len(dataset) == 3
    image, target = dataset[_index_of(dataset, 1)]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 64)
    assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size"}
    assert target["image_id"].dtype == torch.int64 and target["image_id"].item() == 1
    assert target["orig_size"].tolist() == [48, 64] and target["size"].tolist() == [48, 64]
    assert target["labels"].dtype == torch.int64
    # bbox [8, 4, 16, 20] in a 64 x 48 image -> cx (8 + 8) / 64, cy (4 + 10) / 48, w 16 / 64, h 20 / 48
    # bbox [40, 24, 20, 20] -> cx 50 / 64, cy 34 / 48, w 20 / 64, h 20 / 48
    expected = torch.tensor([[0.25, 14 / 48, 0.25, 20 / 48], [50 / 64, 34 / 48, 20 / 64, 20 / 48]])
    torch.testing.assert_close(target["boxes"], expected)


def test_category_ids_sorted_and_mapped_to_contiguous_labels(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations)
    assert dataset.category_ids == [1, 5, 9]
    assert dataset.class_names == ["one", "five", "nine"]
    assert dataset.num_classes == 3
    _, target = dataset[_index_of(dataset, 1)]
    assert target["labels"].tolist() == [1, 2]  # category 5 -> index 1, category 9 -> index 2
    _, target = dataset[_index_of(dataset, 3)]
    assert target["labels"].tolist() == [0]


def test_explicit_identity_mapping(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations, category_ids=list(range(10)))
    assert dataset.category_ids == list(range(10))
    assert dataset.class_names[5] == "five" and dataset.class_names[0] == "N/A"
    _, target = dataset[_index_of(dataset, 1)]
    assert target["labels"].tolist() == [5, 9]


def test_annotation_category_missing_from_explicit_mapping(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    with pytest.raises(DatasetError, match=r"annotation id 11 has category_id 9.*class mapping"):
        CocoDetectionDataset(images_dir, annotations, category_ids=[1, 5])


def test_duplicate_explicit_category_ids(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    with pytest.raises(DatasetError, match="category id 5 appears twice"):
        CocoDetectionDataset(images_dir, annotations, category_ids=[1, 5, 5, 9])


def test_crowd_objects_left_out_but_kept_for_evaluation(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations)
    sample = dataset.load_sample(_index_of(dataset, 1))
    assert len(sample.labels) == 2  # 3 annotations, one of them crowd
    assert dataset.num_crowd == 1
    assert 12 in dataset.coco.getAnnIds(imgIds=[1])


def test_image_without_annotations_is_kept(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations)
    image, target = dataset[_index_of(dataset, 2)]
    assert image.shape == (3, 32, 32)
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["labels"].dtype == torch.int64


def test_coco_object_and_filled_fields(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    data = json.loads(annotations.read_text())
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"]
    annotations.write_text(json.dumps(data))
    dataset = CocoDetectionDataset(images_dir, annotations)
    coco = dataset.coco
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert coco.anns[10]["area"] == 16 * 20 and coco.anns[10]["iscrowd"] == 0


def test_degenerate_boxes_counted_in_one_warning(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    solid_image(64, 48).save(images_dir / "a.jpg")
    boxes = [
        [10, 10, 0, 5],  # zero width: dropped
        [10, 10, 5, -3],  # negative height: dropped
        [70, 10, 5, 5],  # entirely right of the 64-wide image: dropped
        [-5, 30, 20, 25],  # reaches left and bottom: clipped to [0, 30, 15, 48]
        [20, 10, 10, 10],  # fine
    ]
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b} for i, b in enumerate(boxes)]
    images = [{"id": 1, "file_name": "a.jpg", "width": 64, "height": 48}]
    ann_file = write_coco_json(tmp_path / "ann.json", images, annotations, [{"id": 1, "name": "thing"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetectionDataset(images_dir, ann_file)
    repaired = [w for w in caught if issubclass(w.category, AnnotationWarning)]
    assert len(repaired) == 1
    message = str(repaired[0].message)
    assert "dropped 2 boxes of zero or negative size" in message
    assert "1 boxes outside their image" in message and "clipped 1 boxes" in message
    assert dataset.degenerate_box_counts == {"non_positive_size": 2, "outside_image": 1, "clipped": 1,
                                             "float32_resolution": 0}
    sample = dataset.load_sample(0)
    np.testing.assert_allclose(sample.boxes, [[0, 30, 15, 48], [20, 10, 30, 20]])


def test_box_clipped_to_decoded_size_when_json_size_disagrees(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    solid_image(30, 20).save(images_dir / "a.png")
    ann_file = write_coco_json(
        tmp_path / "ann.json", [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 40, 10]}], [{"id": 1, "name": "thing"}],
    )
    dataset = CocoDetectionDataset(images_dir, ann_file)
    with pytest.warns(AnnotationWarning, match=r"a\.png .*differs"):
        sample = dataset.load_sample(0)
    np.testing.assert_allclose(sample.boxes, [[10, 5, 30, 15]])


def test_exif_rotated_image_size_is_the_displayed_one(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    solid_image(40, 20).save(images_dir / "r.jpg", exif=exif.tobytes())
    ann_file = write_coco_json(
        tmp_path / "ann.json", [{"id": 4, "file_name": "r.jpg", "width": 20, "height": 40}],
        [{"id": 1, "image_id": 4, "category_id": 1, "bbox": [0, 0, 10, 40]}], [{"id": 1, "name": "thing"}],
    )
    image, target = CocoDetectionDataset(images_dir, ann_file)[0]
    assert image.shape == (3, 40, 20)
    assert target["orig_size"].tolist() == [40, 20]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.25, 0.5, 0.5, 1.0]]))


# -------------------------------------------------------------------------------- bad annotation files
def _mutated_set(tmp_path, mutate):
    images_dir, annotations = write_small_set(tmp_path)
    data = json.loads(annotations.read_text())
    mutate(data)
    annotations.write_text(json.dumps(data))
    return images_dir, annotations


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("annotations"),
         r"annotations\.json: not a COCO detection file: missing top-level key 'annotations'"),
        (lambda d: d.pop("categories"), r"missing top-level key 'categories'"),
        (lambda d: d.pop("images"), r"missing top-level key 'images'"),
        (lambda d: d["annotations"][1].pop("bbox"), r"annotation id 11 \(annotations\[1\]\) has no 'bbox'"),
        (lambda d: d["annotations"][0].pop("image_id"), r"annotation id 10 .* has no 'image_id'"),
        (lambda d: d["annotations"][3].pop("category_id"), r"annotation id 13 .* has no 'category_id'"),
        (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation id 10 .*'bbox' must be 4"),
        (lambda d: d["annotations"][2].update(category_id=77),
         r"annotation id 12 .* has category_id 77, which is not in 'categories'"),
        (lambda d: d["annotations"][3].update(image_id=99),
         r"annotation id 13 .* refers to image_id 99, which is not in 'images'"),
        (lambda d: d["images"][0].pop("file_name"), r"images\[0\] has no 'file_name'"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), r"annotation id 10 appears twice"),
    ],
)
def test_invalid_annotation_file_names_file_and_key(tmp_path, mutate, pattern):
    images_dir, annotations = _mutated_set(tmp_path, mutate)
    with pytest.raises(DatasetError, match=pattern) as info:
        CocoDetectionDataset(images_dir, annotations)
    assert str(annotations) in str(info.value)


def test_not_json_and_not_a_mapping(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    annotations.write_text("{ not json")
    with pytest.raises(DatasetError, match=r"annotations\.json: not valid JSON"):
        CocoDetectionDataset(images_dir, annotations)
    annotations.write_text("[1, 2]")
    with pytest.raises(DatasetError, match=r"annotations\.json: not a COCO detection file"):
        CocoDetectionDataset(images_dir, annotations)


def test_missing_annotation_file_and_image_folder(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    with pytest.raises(DatasetError, match=r"annotation file not found: .*nothing\.json"):
        CocoDetectionDataset(images_dir, tmp_path / "nothing.json")
    with pytest.raises(DatasetError, match=r"image folder not found: .*no_images"):
        CocoDetectionDataset(tmp_path / "no_images", annotations)


# -------------------------------------------------------------------------------------- bad images
def test_missing_image_detected_at_construction(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    (images_dir / "c.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"1 image file\(s\) .* not found: .*c\.jpg \(image id 3\)"):
        CocoDetectionDataset(images_dir, annotations)


def test_missing_image_detected_at_access(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations, skip_corrupt_images=True)
    (images_dir / "c.jpg").unlink()
    with pytest.raises(MissingImageError, match=r"c\.jpg \(image id 3\)"):
        dataset[_index_of(dataset, 3)]


def test_corrupt_image_raises_naming_file(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    (images_dir / "b.png").write_bytes(b"\x89PNG broken")
    dataset = CocoDetectionDataset(images_dir, annotations)
    with pytest.raises(CorruptImageError, match=r"b\.png \(image id 2\)"):
        dataset[_index_of(dataset, 2)]


def test_corrupt_image_skipped_and_counted_when_asked(tmp_path, caplog):
    images_dir, annotations = write_small_set(tmp_path)
    (images_dir / "b.png").write_bytes(b"\x89PNG broken")
    dataset = CocoDetectionDataset(images_dir, annotations, skip_corrupt_images=True)
    with caplog.at_level(logging.WARNING, logger="detr_lab.data.coco"):
        _, target = dataset[_index_of(dataset, 2)]
    assert target["image_id"].item() == 3  # the next image instead
    assert dataset.num_skipped_images == 1
    messages = [record.getMessage() for record in caplog.records]
    assert any("b.png" in message and "1 skipped" in message for message in messages)


def test_all_images_corrupt_is_an_error(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    for name in ("a.jpg", "b.png", "c.jpg"):
        (images_dir / name).write_bytes(b"junk")
    dataset = CocoDetectionDataset(images_dir, annotations, skip_corrupt_images=True)
    with pytest.raises(DatasetError, match="every image .* failed to decode"):
        dataset[0]
    assert dataset.num_skipped_images == 3


def test_worker_error_still_names_the_file(tmp_path):
    images_dir, annotations = write_small_set(tmp_path)
    dataset = CocoDetectionDataset(images_dir, annotations)
    shutil.move(images_dir / "a.jpg", tmp_path / "moved.jpg")
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_detection)
    with pytest.raises(MissingImageError, match=r"a\.jpg \(image id 1\)"):
        next(iter(loader))


def test_exif_rotated_image_with_stored_size_in_json_warns(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    solid_image(40, 20).save(images_dir / "r.jpg", exif=exif.tobytes())
    ann_file = write_coco_json(
        tmp_path / "ann.json", [{"id": 4, "file_name": "r.jpg", "width": 40, "height": 20}], [],
        [{"id": 1, "name": "thing"}],
    )
    dataset = CocoDetectionDataset(images_dir, ann_file)
    with pytest.warns(AnnotationWarning, match=r"r\.jpg \(image id 4\).*sides swapped: .*EXIF orientation"):
        _, target = dataset[0]
    assert target["orig_size"].tolist() == [40, 20]


def test_boxes_clipped_without_json_size_and_float32_slivers_are_counted(tmp_path):
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    solid_image(64, 48).save(images_dir / "a.jpg")
    solid_image(40, 30).save(images_dir / "b.jpg")
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 20]},  # no json size: clip to 64x48
        {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2**25, 5, 1, 10]},  # x + w == x in float32
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10]},  # fine
    ]
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg", "width": 2**26, "height": 30}]
    ann_file = write_coco_json(tmp_path / "ann.json", images, annotations, [{"id": 1, "name": "thing"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = CocoDetectionDataset(images_dir, ann_file)
    messages = [str(w.message) for w in caught if issubclass(w.category, AnnotationWarning)]
    assert len(messages) == 1
    assert "1 boxes thinner than float32 resolution" in messages[0] and "clipped 1 boxes" in messages[0]
    assert dataset.degenerate_box_counts == {"non_positive_size": 0, "outside_image": 0, "clipped": 1,
                                             "float32_resolution": 1}
    np.testing.assert_allclose(dataset.load_sample(0).boxes, [[50, 40, 64, 48]])
