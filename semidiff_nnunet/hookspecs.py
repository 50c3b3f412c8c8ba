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

A hook exists only for what something chooses by name: a method (``-m NAME``) and a dataset
converter (``semidiff convert NAME``). Building blocks (networks, losses, diffusion schedules and
samplers) are shared as importable modules (``semidiff_nnunet.networks``, ``.losses``,
``.diffusion``), not registered: no command or setting picks one by name. A test checks that every
hook here has a consumer in the package and an example in the README or in ``examples/``.
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
    :class:`~semidiff_nnunet.training.SemiSupervisedTrainer` subclass. Called by
    :meth:`~semidiff_nnunet.registry.Registry.method` (every command that takes ``-m``).
    """


@hookspec
def semidiff_register_converters() -> list:
    """Return a list of :class:`~semidiff_nnunet.specs.ConverterSpec` (``semidiff convert NAME``).

    Called by :meth:`~semidiff_nnunet.registry.Registry.converter` (``semidiff convert``).
    """
