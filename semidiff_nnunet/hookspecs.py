"""The whole plugin contract of semidiff-nnunet.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, advertised
through the ``semidiff`` entry-point group of its distribution::

    [project.entry-points.semidiff]
    my-method = "my_package.plugin"

Each hook is called once when the registry loads and returns a list of specs (possibly
empty) of the type its docstring names; anything else, an exception, or a ``@hookimpl``
whose name matches no hook here is reported as a failure of that plugin and its results
are dropped. Names must be unique per kind across all installed plugins; a clash is an
error that names both providers, and a third-party spec reusing a built-in name is
refused. Built-in methods register through exactly these hooks.
"""

from __future__ import annotations

import pluggy

PROJECT_NAME = "semidiff"
ENTRY_POINT_GROUP = "semidiff"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def semidiff_register_methods() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.MethodSpec`.

    Each spec names a training method (``-m NAME`` on the command line) and gives its
    :class:`~semidiff_nnunet.training.SemiSupervisedTrainer` subclass.
    """


@hookspec
def semidiff_register_networks() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.NetworkSpec` (named network factories)."""


@hookspec
def semidiff_register_diffusion_heads() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.DiffusionHeadSpec`."""


@hookspec
def semidiff_register_losses() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.LossSpec`."""


@hookspec
def semidiff_register_converters() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.ConverterSpec` (``semidiff convert NAME``)."""
