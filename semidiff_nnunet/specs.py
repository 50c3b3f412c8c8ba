"""Spec dataclasses returned by plugin hooks (see :mod:`semidiff_nnunet.hookspecs`).

Every spec has a unique ``name`` within its kind, a one-line ``summary`` and a ``reference``
(paper). Specs are frozen; the registry records which plugin provided each one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ComponentSpec:
    """A named factory for a building block (network, loss, diffusion head)."""

    name: str
    factory: Callable[..., Any]
    summary: str = ""
    reference: str = ""

    def create(self, *args, **kwargs):
        return self.factory(*args, **kwargs)


@dataclass(frozen=True)
class NetworkSpec(ComponentSpec):
    """``factory(**kwargs) -> torch.nn.Module``."""


@dataclass(frozen=True)
class LossSpec(ComponentSpec):
    """``factory(**kwargs) -> callable loss``."""


@dataclass(frozen=True)
class DiffusionHeadSpec(ComponentSpec):
    """``factory(**kwargs) -> diffusion head`` (a network plus its noise schedule)."""


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
        if isinstance(self.trainer, str):
            import importlib

            module, _, attr = self.trainer.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.trainer


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
