"""The checks semidiff runs on its built-in methods, run on this plugin's method (tens of seconds each on a
CPU): ``pytest tests`` after ``pip install -e .``."""

from semidiff_nnunet import testing

METHOD = "pseudo-label"


def test_trains(semidiff_dataset2d):
    testing.assert_trains(semidiff_dataset2d, METHOD)


def test_resumes_exactly(semidiff_dataset2d):
    testing.assert_resumes_exactly(semidiff_dataset2d, METHOD)


def test_exports_to_stock_nnunet(semidiff_dataset2d, tmp_path):
    testing.assert_exports_to_stock_nnunet(semidiff_dataset2d, METHOD, tmp_path)


def test_hidden_labels_never_reach_a_loss(semidiff_dataset2d):
    testing.assert_hidden_labels_never_reach_a_loss(semidiff_dataset2d, METHOD)
