from pathlib import Path

import pytest

from etesvs.data.layout import DatasetLayout, parse_video_path_rules, read_ground_truth, read_mapping, read_split
from etesvs.errors import EtesvsError


def test_read_mapping_orders_by_id(tmp_path):
    path = tmp_path / "mapping.txt"
    path.write_text("1 take\n0 background\n2 pour\n")
    assert read_mapping(path) == ["background", "take", "pour"]


@pytest.mark.parametrize(
    "text, fault",
    [
        ("0 background\n0 take\n", "id 0 appears twice"),
        ("0 background\ntake\n", ":2: expected '<id> <name>'"),
        ("0 background\n2 take\n", "without gaps"),
        ("0 a\n1 a\n", "appears twice"),
        ("", "empty mapping"),
    ],
)
def test_read_mapping_rejects_malformed(tmp_path, text, fault):
    path = tmp_path / "mapping.txt"
    path.write_text(text)
    with pytest.raises(EtesvsError, match="mapping.txt") as error:
        read_mapping(path)
    assert fault in str(error.value)
    assert "\n" not in str(error.value)


def test_read_split_strips_txt_and_rejects_empty(tmp_path):
    path = tmp_path / "test.split1.bundle"
    path.write_text("S1_Cheese_C1.txt\nS1_Tea_C1\n\n")
    assert read_split(path) == ["S1_Cheese_C1", "S1_Tea_C1"]
    path.write_text("\n")
    with pytest.raises(EtesvsError, match="empty split"):
        read_split(path)


def test_read_ground_truth_errors(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("")
    with pytest.raises(EtesvsError, match="v.txt: empty label file"):
        read_ground_truth(path)
    path.write_text("a\n\nb\n")
    with pytest.raises(EtesvsError, match="v.txt:2: empty label line"):
        read_ground_truth(path)
    with pytest.raises(EtesvsError, match="missing.txt: file not found"):
        read_ground_truth(tmp_path / "missing.txt")


def test_breakfast_video_paths(tmp_path):
    rules = parse_video_path_rules(
        r"(P\d+)_(stereo)01_(.+) -> \1/\2/\3_ch0; (P\d+)_([a-z]*cam\d+)_(.+) -> \1/\2/\3"
    )
    layout = DatasetLayout(tmp_path, video_path_rules=rules)
    assert layout.video_stem("P03_cam01_P03_cereals") == "P03/cam01/P03_cereals"
    assert layout.video_stem("P03_stereo01_P03_cereals") == "P03/stereo/P03_cereals_ch0"
    assert layout.video_stem("P54_webcam02_P54_tea") == "P54/webcam02/P54_tea"
    assert layout.video_stem("S1_Tea_C1") == "S1_Tea_C1"
    target = tmp_path / "Videos" / "P03" / "stereo" / "P03_cereals_ch0.avi"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    assert layout.video_file("P03_stereo01_P03_cereals") == target
    with pytest.raises(EtesvsError, match="P03_cam01_P03_cereals' not found"):
        layout.video_file("P03_cam01_P03_cereals")


def test_bad_video_path_rule():
    with pytest.raises(EtesvsError, match="expected 'PATTERN -> REPLACEMENT'"):
        parse_video_path_rules("no arrow")
    with pytest.raises(EtesvsError, match="bad regular expression"):
        parse_video_path_rules("(unclosed -> x")


def test_check_dataset_names_the_expected_layout(tmp_path):
    from etesvs.data.layout import check_dataset

    root = tmp_path / "gtea"
    layout = DatasetLayout(root)
    expected = f"put gtea there in the MS-TCN layout {root}/{{Videos,groundTruth,splits,mapping.txt}} (README: Real datasets)"
    with pytest.raises(EtesvsError) as error:
        check_dataset(layout, name="gtea", split=1)
    assert str(error.value) == f"{root}: dataset 'gtea' not found; {expected}"
    (root / "groundTruth").mkdir(parents=True)
    (root / "mapping.txt").write_text("0 background\n1 take\n")
    with pytest.raises(EtesvsError) as error:
        check_dataset(layout, name="gtea", split=2)
    assert str(error.value) == (f"{root}: dataset 'gtea' lacks Videos, splits/train.split2.bundle, "
                                f"splits/test.split2.bundle; {expected}")
    (root / "Videos").mkdir()
    (root / "Videos" / "a.mp4").write_bytes(b"")
    (root / "groundTruth" / "a.txt").write_text("take\n")
    (root / "splits").mkdir()
    for subset in ("train", "test"):
        (root / "splits" / f"{subset}.split2.bundle").write_text("a.txt\n")
    assert check_dataset(layout, name="gtea", split=2) == {"videos": 1, "label_files": 1, "classes": 2}
