"""Manifest adapters on tiny annotation files written in each dataset's exact official format."""

import json
import os

import pytest

from evl_cache.datasets import Manifest, list_datasets, load_manifest
from evl_cache.errors import UserError


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


# ------------------------------------------------------------------------------------ registry


def test_registry_names_and_unknown_dataset(tmp_path):
    assert {"k400", "k600", "k700", "ssv2", "ucf101", "hmdb51", "list"} <= set(list_datasets())
    with pytest.raises(UserError, match="unknown dataset 'kinetics'.*hmdb51.*k400.*list.*ssv2.*ucf101"):
        load_manifest("kinetics", tmp_path, "train")


# ------------------------------------------------------------------------------------ kinetics

K400_TRAIN = """label,youtube_id,time_start,time_end,split
riding a bike,aaa111,14,24,train
abseiling,bbb222,0,10,train
"zumba, fast",ccc333,100,110,train
abseiling,ddd444,5,15,train
"""
K400_VAL = """label,youtube_id,time_start,time_end,split
abseiling,eee555,30,40,val
zumba, fast,fff666,1,11,val
"""


def _k400(tmp_path):
    root = tmp_path / "k400"
    _write(root / "annotations" / "train.csv", K400_TRAIN)
    return root


def test_k400_paths_labels_and_alphabetical_classes(tmp_path):
    root = _k400(tmp_path)
    flat = _touch(root / "train" / "aaa111_000014_000024.mkv")  # flat layout, non-mp4 extension
    nested = _touch(root / "train" / "abseiling" / "bbb222_000000_000010.webm")  # class-folder layout
    _touch(root / "train" / "ddd444_000005_000015.avi")
    _touch(root / "train" / "ddd444_000005_000015.mp4")  # mp4 preferred over avi
    m = load_manifest("k400", root, "train")
    assert isinstance(m, Manifest) and len(m) == 4 and m.name == "k400" and m.split == "train"
    assert m.class_names == ["abseiling", "riding a bike", "zumba, fast"]
    assert m.labels == [1, 0, 2, 0]
    assert m.paths[0] == flat and m.paths[1] == nested
    # missing clip: not an error, gets the .mp4 name under <root>/<split> so extraction records it
    assert m.paths[2] == str(root / "train" / "ccc333_000100_000110.mp4")
    assert m.paths[3] == str(root / "train" / "ddd444_000005_000015.mp4")
    assert all(os.path.isabs(p) for p in m.paths)


def test_k400_val_uses_train_classes_and_rejects_unknown(tmp_path):
    root = _k400(tmp_path)
    _write(root / "annotations" / "validate.csv", K400_VAL.replace("zumba, fast,fff666", '"zumba, fast",fff666'))
    m = load_manifest("k400", root, "val")  # val -> validate.csv alias
    assert m.class_names == ["abseiling", "riding a bike", "zumba, fast"]  # train's 3, not val's 2
    assert m.labels == [0, 2]
    assert m.paths[0] == str(root / "val" / "eee555_000030_000040.mp4")
    bad = _write(root / "annotations" / "test.csv", "label,youtube_id,time_start,time_end,split\nyoga,x,1,2,test\n")
    with pytest.raises(UserError, match=rf"{bad}:2: class 'yoga' is not among the 3 training classes"):
        load_manifest("k400", root, "test")


def test_k400_own_classes_without_train_csv_and_unlabeled_test(tmp_path):
    ann = _write(tmp_path / "ann" / "val.csv", "label,youtube_id,time_start,time_end,split\nb,y,1,2,val\na,z,3,4,val\n")
    m = load_manifest("k700", tmp_path / "vids", "val", annotations=str(ann))
    assert m.class_names == ["a", "b"] and m.labels == [1, 0] and m.name == "k700"
    # K600 test CSV: no label column -> unlabeled
    test = _write(tmp_path / "ann2" / "test.csv", "youtube_id,time_start,time_end,split\nq,0,10,test\n")
    m = load_manifest("k600", tmp_path / "vids", "test", annotations=str(test.parent))
    assert m.labels == [-1] and m.paths == [str(tmp_path / "vids" / "test" / "q_000000_000010.mp4")]


def test_k400_errors(tmp_path):
    root = _k400(tmp_path)
    with pytest.raises(UserError, match="no annotation file for split 'valx'.*splits found there: train"):
        load_manifest("k400", root, "valx")
    bad = _write(tmp_path / "b.csv", "youtube,time_start,time_end\nq,0,10\n")
    with pytest.raises(UserError, match=rf"{bad}:1: header .* lacks column\(s\) youtube_id"):
        load_manifest("k400", root, "train", annotations=str(bad))
    bad2 = _write(tmp_path / "c.csv", "label,youtube_id,time_start,time_end,split\na,q,zero,10,train\n")
    with pytest.raises(UserError, match=rf"{bad2}:2: time_start/time_end"):
        load_manifest("k400", root, "train", annotations=str(bad2))
    with pytest.raises(UserError, match="does not exist"):
        load_manifest("k400", root, "train", annotations=str(tmp_path / "nope"))


# ---------------------------------------------------------------------------------------- ssv2

SSV2_LABELS = {"Putting something on something": "1", "Holding something": "0",
               "Pushing something from left to right": "2"}
SSV2_TRAIN = [
    {"id": "78687", "label": "holding potato next to vicks vaporub bottle", "template": "Holding [something]",
     "placeholders": ["potato"]},
    {"id": "42326", "label": "putting a pen on a book", "template": "Putting [something] on [something]",
     "placeholders": ["a pen", "a book"]},
    {"id": "100904", "label": "pushing a cup from left to right",
     "template": "Pushing [something] from left to right", "placeholders": ["a cup"]},
]


def _ssv2(tmp_path):
    root = tmp_path / "ssv2"
    _write(root / "labels" / "something-something-v2-labels.json", json.dumps(SSV2_LABELS))
    _write(root / "labels" / "something-something-v2-train.json", json.dumps(SSV2_TRAIN))
    _write(root / "labels" / "something-something-v2-validation.json", json.dumps(SSV2_TRAIN[1:]))
    _write(root / "labels" / "something-something-v2-test.json", json.dumps([{"id": "1"}, {"id": "2"}]))
    return root


def test_ssv2_templates_map_to_label_indices(tmp_path):
    root = _ssv2(tmp_path)
    m = load_manifest("ssv2", root, "train")
    assert m.class_names == ["Holding something", "Putting something on something",
                             "Pushing something from left to right"]
    assert m.labels == [0, 1, 2]
    assert m.paths == [str(root / f"{i}.webm") for i in ("78687", "42326", "100904")]
    assert load_manifest("ssv2", root, "val").labels == [1, 2]
    assert load_manifest("ssv2", root, "test").labels == [-1, -1]


def test_ssv2_errors(tmp_path):
    root = _ssv2(tmp_path)
    with pytest.raises(UserError, match="unknown split 'dev'"):
        load_manifest("ssv2", root, "dev")
    bad = root / "labels" / "something-something-v2-train.json"
    bad.write_text(json.dumps([{"id": "5", "template": "Dropping [something]"}]))
    with pytest.raises(UserError, match=rf"{bad}: entry 0 \(id 5\): template 'Dropping something' is not in"):
        load_manifest("ssv2", root, "train")
    bad.write_text('[{"id": "5",')
    with pytest.raises(UserError, match=rf"{bad}:1: invalid JSON"):
        load_manifest("ssv2", root, "train")
    with pytest.raises(UserError, match="ssv2 train list not found"):
        load_manifest("ssv2", tmp_path / "empty", "train")


# -------------------------------------------------------------------------------------- ucf101

UCF_CLASSIND = "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 HandstandPushups\r\n"
UCF_TRAIN = ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
             "HandstandPushups/v_HandStandPushups_g08_c01.avi 3\r\n"
             "ApplyLipstick/v_ApplyLipstick_g09_c02.avi 2\r\n")
UCF_TEST = ("ApplyLipstick/v_ApplyLipstick_g01_c01.avi\r\n"
            "HandstandPushups/v_HandStandPushups_g01_c01.avi\r\n")


def _ucf(tmp_path):
    root = tmp_path / "UCF-101"
    ann = root / "ucfTrainTestlist"
    _write(ann / "classInd.txt", UCF_CLASSIND)
    _write(ann / "trainlist01.txt", UCF_TRAIN)
    _write(ann / "testlist01.txt", UCF_TEST)
    return root


def test_ucf101_train_and_test_lists(tmp_path):
    root = _ucf(tmp_path)
    m = load_manifest("ucf101", root, "train1")
    assert m.class_names == ["ApplyEyeMakeup", "ApplyLipstick", "HandstandPushups"]
    assert m.labels == [0, 2, 1]  # 1-based in the file
    assert m.paths[1] == str(root / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi")
    t = load_manifest("ucf101", root, "test1")
    assert t.labels == [1, 2]  # from the folder via classInd
    assert t.paths[0] == str(root / "ApplyLipstick" / "v_ApplyLipstick_g01_c01.avi")


def test_ucf101_errors(tmp_path):
    root = _ucf(tmp_path)
    with pytest.raises(UserError, match="unknown split 'train'.*train1"):
        load_manifest("ucf101", root, "train")
    with pytest.raises(UserError, match="trainlist02.txt not found"):
        load_manifest("ucf101", root, "train2")
    bad = _write(root / "ucfTrainTestlist" / "trainlist03.txt", "ApplyEyeMakeup/v_a.avi 1\nApplyEyeMakeup/v_b.avi 4\n")
    with pytest.raises(UserError, match=rf"{bad}:2: expected"):
        load_manifest("ucf101", root, "train3")
    bad = _write(root / "ucfTrainTestlist" / "testlist02.txt", "Yoga/v_Yoga_g01_c01.avi\n")
    with pytest.raises(UserError, match=rf"{bad}:1: folder 'Yoga' is not a class"):
        load_manifest("ucf101", root, "test2")


# -------------------------------------------------------------------------------------- hmdb51


def _hmdb(tmp_path):
    root = tmp_path / "hmdb51"
    ann = root / "testTrainMulti_7030_splits"
    _write(ann / "wave_test_split1.txt", "w1.avi 1 \nw2.avi 2 \nw3.avi 0 \n")
    _write(ann / "brush_hair_test_split1.txt", "b1.avi 2 \nb2.avi 1 \n")
    _write(ann / "brush_hair_test_split2.txt", "b1.avi 1 \nb2.avi 2 \n")
    _write(ann / "wave_test_split2.txt", "w1.avi 2 \n")
    return root


def test_hmdb51_splits(tmp_path):
    root = _hmdb(tmp_path)
    tr = load_manifest("hmdb51", root, "train1")
    assert tr.class_names == ["brush_hair", "wave"]
    assert tr.paths == [str(root / "brush_hair" / "b2.avi"), str(root / "wave" / "w1.avi")]
    assert tr.labels == [0, 1]
    te = load_manifest("hmdb51", root, "test1")
    assert te.paths == [str(root / "brush_hair" / "b1.avi"), str(root / "wave" / "w2.avi")] and te.labels == [0, 1]
    assert load_manifest("hmdb51", root, "test2").paths[-1] == str(root / "wave" / "w1.avi")


def test_hmdb51_errors(tmp_path):
    root = _hmdb(tmp_path)
    with pytest.raises(UserError, match="no '<class>_test_split3.txt' files"):
        load_manifest("hmdb51", root, "train3")
    with pytest.raises(UserError, match="unknown split 'val'"):
        load_manifest("hmdb51", root, "val")
    bad = _write(root / "testTrainMulti_7030_splits" / "wave_test_split3.txt", "w1.avi 1\nw2.avi train\n")
    with pytest.raises(UserError, match=rf"{bad}:2: expected"):
        load_manifest("hmdb51", root, "train3")


# ---------------------------------------------------------------------------------------- list


def test_list_names_ints_classes_file_and_absolute_paths(tmp_path):
    root = tmp_path / "data"
    _write(root / "train.csv", "path,label\nb/1.mp4,dog\na/2.mp4,cat\n/abs/3.mp4,dog\nc/4.mp4,\n")
    m = load_manifest("list", root, "train")
    assert m.class_names == ["cat", "dog"] and m.labels == [1, 0, 1, -1]
    assert m.paths == [str(root / "b/1.mp4"), str(root / "a/2.mp4"), "/abs/3.mp4", str(root / "c/4.mp4")]
    ints = _write(tmp_path / "ints.csv", "path,label\nx.mp4,3\ny.mp4,0\n")
    m = load_manifest("list", root, "whatever", annotations=str(ints))
    assert m.class_names == ["0", "1", "2", "3"] and m.labels == [3, 0]
    cls = _write(tmp_path / "classes.txt", "dog\ncat\nbird\n")
    m = load_manifest("list", root, "train", classes=str(cls))
    assert m.class_names == ["dog", "cat", "bird"] and m.labels == [0, 1, 0, -1]
    # classes.txt beside the CSV is picked up automatically (the synthetic writer leaves one)
    _write(root / "classes.txt", "dog\ncat\n")
    assert load_manifest("list", root, "train").class_names == ["dog", "cat"]
    with pytest.raises(UserError, match=rf"{ints}:2: label '3' is neither a class name nor an index < 3"):
        load_manifest("list", root, "train", annotations=str(ints), classes=str(cls))


def test_list_errors(tmp_path):
    with pytest.raises(UserError, match="no annotation file for split 'train'"):
        load_manifest("list", tmp_path, "train")
    bad = _write(tmp_path / "train.csv", "file,label\na.mp4,x\n")
    with pytest.raises(UserError, match=rf"{bad}:1: header .*lacks column\(s\) path"):
        load_manifest("list", tmp_path, "train")
    bad.write_text("path,label\na.mp4,x,extra\n")
    with pytest.raises(UserError, match=rf"{bad}:2: 3 fields but the header has 2"):
        load_manifest("list", tmp_path, "train")
    bad.write_text("")
    with pytest.raises(UserError, match=rf"{bad}:1: empty file"):
        load_manifest("list", tmp_path, "train")
    bad.write_text("path,label\na.mp4,x\n")
    dup = _write(tmp_path / "dup.txt", "x\ny\nx\n")
    with pytest.raises(UserError, match=rf"{dup}: class 'x' listed twice"):
        load_manifest("list", tmp_path, "train", classes=str(dup))
    with pytest.raises(UserError, match="classes file not found"):
        load_manifest("list", tmp_path, "train", classes=str(tmp_path / "none.txt"))


# -------------------------------------------------------------------------------------- sha256


def test_sha256_stable_under_root_move_and_sensitive_to_content(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "elsewhere" / "b"
    for r in (a, b):
        _write(r / "train.csv", "path,label\nx.mp4,dog\ny.mp4,cat\n")
    ma, mb = load_manifest("list", a, "train"), load_manifest("list", b, "train")
    assert ma.paths != mb.paths and ma.sha256() == mb.sha256()
    assert len(ma.sha256()) == 64 and ma.sha256() == load_manifest("list", a, "train").sha256()
    base = ma.sha256()
    for field, value in [("labels", [1, 1]), ("class_names", ["cat", "dog2"]),
                         ("paths", [ma.paths[1], ma.paths[0]])]:
        m = Manifest(**{**ma.__dict__, field: value})
        assert m.sha256() != base, field
