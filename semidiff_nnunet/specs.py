"""Spec dataclasses returned by plugin hooks (see :mod:`semidiff_nnunet.hookspecs`).

Every spec has a unique ``name`` within its kind, a one-line ``summary`` and a ``reference``
(paper). Specs are frozen; the registry records which plugin provided each one. A method's name
lives in its :class:`MethodSpec` only: the trainer's ``method_name`` reads it
(:class:`~semidiff_nnunet.registry.RegisteredName`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def load_object(ref: Any) -> Any:
    """``"package.module:attr"`` → the object (imported now); anything else is returned as it is.

    Specs may name their classes and factories this way so that listing what is installed
    (``semidiff methods``) imports neither torch nor nnU-Net.
    """
    if not isinstance(ref, str):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep or not attr:
        raise ValueError(f"{ref!r}: expected 'package.module:attribute'.")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def lazy_module_getattr(package: str, submodule: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that serves missing names from ``submodule``, imported on
    first use: a plugin package's ``__init__`` registers its specs cheaply and still re-exports its
    trainer (``from semidiff_nnunet.plugins.mean_teacher import MeanTeacherTrainer``)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(submodule, package), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__


@dataclass(frozen=True)
class MethodSpec:
    """A semi-supervised training method.

    ``trainer`` is a subclass of :class:`semidiff_nnunet.training.SemiSupervisedTrainer`; its
    class attribute ``hparams_class`` (a dataclass) holds the method's hyperparameters with the
    paper's defaults. ``trainer`` may also be given as ``"module:ClassName"`` to defer the import.
    """

    name: str
    trainer: Any
    summary: str = ""
    reference: str = ""

    def load_trainer(self) -> type:
        return load_object(self.trainer)


@dataclass(frozen=True)
class ConverterSpec:
    """Converts one public dataset from its original download layout to nnU-Net raw format.

    ``convert(source, target_dir, **options)`` writes a complete nnU-Net raw dataset
    (``imagesTr``, ``labelsTr``, optional ``imagesTs``/``labelsTs``/``imagesUnlabeled``,
    ``dataset.json``) into ``target_dir`` (a temporary folder the caller moves into place).
    """

    name: str
    convert: Callable[..., Any]
    summary: str = ""
    reference: str = ""
    default_id: int | None = None
    default_name: str = ""
    source_layout: str = ""
    download_hint: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
