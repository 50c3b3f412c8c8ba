import json

import pytest

from semidiff_nnunet.errors import SemidiffError
from semidiff_nnunet.training.splits import LabeledSpec, make_semi_split, number_labeled

TRAIN = [f"case_{i:02d}" for i in range(20)]
VAL = [f"val_{i}" for i in range(5)]


def test_parse_fraction_count_file(tmp_path):
    assert LabeledSpec.parse("0.1").fraction == 0.1
    assert LabeledSpec.parse("1.0").fraction == 1.0
    assert LabeledSpec.parse("8").count == 8
    assert LabeledSpec.parse("1").count == 1
    f = tmp_path / "ids.txt"
    f.write_text("case_03\ncase_01, case_02\n\n", encoding="utf-8")
    spec = LabeledSpec.parse(str(f))
    assert spec.ids == ("case_01", "case_02", "case_03")
    assert spec.tag.startswith("labfile3-")
    assert LabeledSpec.parse("0.1").tag == "lab0.1" and LabeledSpec.parse("8").tag == "lab8cases"


@pytest.mark.parametrize("bad", ["0", "0.0", "1.5", "-0.2", "abc", "missing_file.txt"])
def test_parse_rejects(bad):
    with pytest.raises(SemidiffError):
        LabeledSpec.parse(bad)


def test_split_is_disjoint_reproducible_and_excludes_validation():
    spec = LabeledSpec.parse("0.25")
    a = make_semi_split(TRAIN, VAL, spec, seed=3)
    b = make_semi_split(list(reversed(TRAIN)), VAL, spec, seed=3)
    assert a.labeled == b.labeled  # order of input keys does not matter
    assert len(a.labeled) == 5 and len(a.unlabeled) == 15
    assert set(a.labeled).isdisjoint(a.unlabeled)
    assert set(a.labeled) | set(a.unlabeled) == set(TRAIN)
    assert not (set(a.labeled) | set(a.unlabeled)) & set(VAL)
    c = make_semi_split(TRAIN, VAL, spec, seed=4)
    assert c.labeled != a.labeled


def test_smaller_fraction_is_subset_of_larger():
    for seed in range(5):
        small = make_semi_split(TRAIN, VAL, LabeledSpec.parse("0.1"), seed).labeled
        large = make_semi_split(TRAIN, VAL, LabeledSpec.parse("0.3"), seed).labeled
        assert set(small) < set(large)


def test_counts_and_rounding():
    assert number_labeled(LabeledSpec.parse("0.01"), 20) == 1  # at least one case
    assert number_labeled(LabeledSpec.parse("0.125"), 20) == 3  # 2.5 rounds half up
    assert number_labeled(LabeledSpec.parse("1.0"), 20) == 20
    with pytest.raises(SemidiffError, match="at most 20"):
        make_semi_split(TRAIN, VAL, LabeledSpec.parse("21"), 0)


def test_id_file_checked_against_fold(tmp_path):
    f = tmp_path / "ids.json"
    f.write_text(json.dumps({"labeled": ["case_00", "val_1"]}), encoding="utf-8")
    with pytest.raises(SemidiffError, match="validation"):
        make_semi_split(TRAIN, VAL, LabeledSpec.parse(str(f)), 0)
    f.write_text(json.dumps(["case_00", "nope"]), encoding="utf-8")
    with pytest.raises(SemidiffError, match="not training cases"):
        make_semi_split(TRAIN, VAL, LabeledSpec.parse(str(f)), 0)
    f.write_text(json.dumps(["case_00", "case_05"]), encoding="utf-8")
    s = make_semi_split(TRAIN, VAL, LabeledSpec.parse(str(f)), 0, extra_unlabeled=["u1"], pseudo_available=["u1", "val_1"])
    assert s.labeled == ["case_00", "case_05"] and s.extra_unlabeled == ["u1"]
    assert s.pseudo == ["u1"]  # a validation case's pseudo label is never used
