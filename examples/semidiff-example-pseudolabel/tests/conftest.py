# The test kit of semidiff-nnunet: fixtures semidiff_dataset2d/3d and the checks in semidiff_nnunet.testing.
pytest_plugins = ["semidiff_nnunet.testing"]
