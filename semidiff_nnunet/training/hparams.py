"""Method hyperparameters: a dataclass per method, defaults from its paper, ``--set key=value``."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass

from semidiff_nnunet.errors import SemidiffError


@dataclass
class BaseHParams:
    """Settings every method has.

    unlabeled_batch_size: patches per unlabeled batch; 0 means the labeled batch size from the
        plans (SSL4MIS uses equal labeled/unlabeled halves of each batch).
    """

    unlabeled_batch_size: int = 0


def _convert(value: str, annotation, name: str):
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation.split("|")[0].strip(), str)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0]
    try:
        if annotation is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if annotation in (int, float, str):
            return annotation(value)
        return json.loads(value)
    except (ValueError, json.JSONDecodeError):
        raise SemidiffError(f"--set {name}={value}: expected a value of type "
                            f"{getattr(annotation, '__name__', annotation)}.") from None


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SemidiffError(f"--set {item!r}: write overrides as key=value, e.g. --set consistency=0.2.")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def resolve_hparams(cls: type, overrides: dict[str, typing.Any] | None = None):
    """Instantiate ``cls`` with string (CLI) or typed overrides; unknown keys get closest names."""
    overrides = dict(overrides or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise SemidiffError(f"Unknown hyperparameter {key!r} for this method.{hint} "
                                f"Known: {', '.join(sorted(fields))}.")
        kwargs[key] = _convert(value, hints.get(key, str), key) if isinstance(value, str) else value
    return cls(**kwargs)


def hparams_to_dict(hp) -> dict:
    return dataclasses.asdict(hp)
