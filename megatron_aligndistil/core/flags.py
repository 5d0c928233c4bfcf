"""Command-line flags generated from dataclass fields: a setting's flag names, help, choices,
range, default and run-identity key are written once, on its field (:func:`setting`).

    @dataclass
    class Optimizer:
        lr: float = setting(help="peak learning rate", range=POSITIVE, identity=True)

    add_flags(parser, Optimizer)          # --lr, type float, help, default from the field
    Optimizer(**field_values(Optimizer, parser.parse_args()))
    range_errors(args, [Optimizer])       # "--lr -1.0 is out of range (0, inf)"
    identity_of(Optimizer(lr=1e-5))       # {"lr": 1e-05}

The argparse dest of a field is its name unless the setting says otherwise (``dest``), and the
flag's value reaches the field through ``to_field`` (``--tvd-without-half`` -> ``tvd_half``).
Imports nothing from the package: the core layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``lo`` / ``hi`` bounds (None: unbounded), each inclusive or not."""

    lo: float
    lo_inclusive: bool = True
    hi: float | None = None
    hi_inclusive: bool = True

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = value >= self.lo if self.lo_inclusive else value > self.lo
        below = self.hi is None or (value <= self.hi if self.hi_inclusive else value < self.hi)
        return above and below

    def __str__(self) -> str:
        left = f"[{self.lo}" if self.lo_inclusive else f"({self.lo}"
        right = "inf)" if self.hi is None else (f"{self.hi}]" if self.hi_inclusive else f"{self.hi})")
        return f"{left}, {right}"


AT_LEAST_1 = Range(1)
POSITIVE = Range(0, False)
NON_NEGATIVE = Range(0)
UNIT_OPEN_RIGHT = Range(0, True, 1, False)  # [0, 1)
UNIT_OPEN_LEFT = Range(0, False, 1, True)  # (0, 1]
UNIT_OPEN = Range(0, False, 1, False)  # (0, 1)


class _Same:
    """``flag_default`` not given: the flag's default is the field's."""


SAME = _Same()


@dataclass(frozen=True)
class Flag:
    """How one dataclass field appears on the command line (see :func:`setting`)."""

    help: str
    names: tuple = ()
    dest: str | None = None
    choices: tuple | None = None
    range: Range | None = None
    group: str | None = None
    metavar: str | None = None
    required: bool = False
    store_true: bool | None = None
    type: type | None = None
    nargs: str | None = None
    flag_default: object = SAME
    to_field: typing.Callable | None = None
    identity: bool | typing.Callable = False


def setting(default=MISSING, *, help: str, flags: tuple = (), dest: str | None = None, choices=None,
            range: Range | None = None, group: str | None = None, metavar: str | None = None,
            store_true: bool | None = None, type=None, nargs: str | None = None, flag_default=SAME,
            to_field=None, identity=False, default_factory=MISSING):
    """A dataclass field with its command-line flag.

    ``flags``: the flag's names (default ``--`` + the field name with dashes); ``dest``: the
    argparse dest (default the field name). A field without a default is a required flag. The
    flag's type comes from the annotation (``bool`` is ``store_true``; ``int | None`` is ``int``;
    a ``tuple`` is ``nargs='*'`` of ints) unless ``type`` / ``store_true`` / ``nargs`` say.
    ``flag_default``: the flag's default where it differs from the field's (e.g. None to see
    whether the flag was given); ``to_field`` turns the flag's value into the field's.
    ``identity``: the field belongs to the run identity (a resumed run must keep it), under its
    dest; a callable maps the field's value to the identity's.
    """
    spec = Flag(help=help, names=tuple(flags), dest=dest, choices=None if choices is None else tuple(choices),
                range=range, group=group, metavar=metavar, required=default is MISSING and default_factory is MISSING,
                store_true=store_true, type=type, nargs=nargs, flag_default=flag_default, to_field=to_field,
                identity=identity)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"flag": spec})


def flags_of(cls, exclude: tuple = (), only: tuple | None = None) -> list[tuple[dataclasses.Field, Flag]]:
    """``(field, Flag)`` of each field of ``cls`` that has a flag (not in ``exclude``; in ``only``
    when given), in field order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(cls)
            if "flag" in f.metadata and f.name not in exclude and (only is None or f.name in only)]


def dest_of(field: dataclasses.Field) -> str:
    return field.metadata["flag"].dest or field.name


def names_of(field: dataclasses.Field) -> tuple:
    spec = field.metadata["flag"]
    return spec.names or ("--" + field.name.replace("_", "-"),)


def _value_type(cls, field):
    """The field's annotation without ``None``: ``int | None`` -> int."""
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else str
    return hint


def add_groups(parser: argparse.ArgumentParser, titles) -> None:
    """Create ``parser``'s argument groups in this order (``--help`` shows them so)."""
    groups = parser.__dict__.setdefault("_flag_groups", {})
    for title in titles:
        if title not in groups:
            groups[title] = parser.add_argument_group(title)


def add_flags(parser: argparse.ArgumentParser, cls, exclude: tuple = (), only: tuple | None = None) -> None:
    """Add a flag per field of ``cls`` (:func:`flags_of`) to ``parser``, each in the argument group
    its setting names (groups of the same title are shared between classes); the help shows the
    default and the range."""
    add_groups(parser, ())
    groups = parser.__dict__["_flag_groups"]
    for field, spec in flags_of(cls, exclude, only):
        title = spec.group or cls.__name__
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        kwargs = {"dest": dest_of(field), "help": spec.help + (f"; in {spec.range}" if spec.range else "")}
        if spec.flag_default is not SAME:
            default = spec.flag_default
        elif field.default is not MISSING:
            default = field.default
        elif field.default_factory is not MISSING:
            default = field.default_factory()
        else:
            default = None
        hint = spec.type or _value_type(cls, field)
        if spec.store_true or (spec.store_true is None and hint is bool):
            kwargs.update(action="store_true")
        else:
            kwargs.update(default=default, required=spec.required)
            if default is not None and not spec.required:
                kwargs["help"] += f" (default: {default})"
            if spec.choices is not None:
                kwargs["choices"] = list(spec.choices)
            if hint in (tuple, list) or spec.nargs:
                kwargs.update(nargs=spec.nargs or "*", type=int if hint in (tuple, list) else hint)
            elif hint in (int, float):
                kwargs["type"] = hint
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
        groups[title].add_argument(*names_of(field), **kwargs)


def field_values(cls, args: argparse.Namespace, exclude: tuple = (), only: tuple | None = None) -> dict:
    """``{field name: value}`` of ``cls``'s flagged fields from parsed ``args`` (through each
    setting's ``to_field``); fields whose dest ``args`` lacks are left out."""
    out = {}
    for field, spec in flags_of(cls, exclude, only):
        dest = dest_of(field)
        if hasattr(args, dest):
            value = getattr(args, dest)
            if spec.to_field is not None:
                value = spec.to_field(value)
            elif isinstance(value, list):
                value = tuple(value)
            out[field.name] = value
    return out


def identity_of(config) -> dict:
    """The run identity of a config: ``{dest: value}`` of its fields marked ``identity``."""
    out = {}
    for field, spec in flags_of(type(config)):
        if spec.identity:
            value = getattr(config, field.name)
            out[dest_of(field)] = spec.identity(value) if callable(spec.identity) else value
    return out


def ranges(classes) -> dict[str, Range]:
    """``{dest: Range}`` of every ranged field of ``classes``."""
    return {dest_of(f): spec.range for cls in classes for f, spec in flags_of(cls) if spec.range is not None}


def flag_names(classes) -> dict[str, str]:
    """``{dest: how messages name the flag}``: its names, the first outside parentheses."""
    out = {}
    for cls in classes:
        for field, _ in flags_of(cls):
            first, *others = names_of(field)
            out[dest_of(field)] = first + (f" ({', '.join(others)})" if others else "")
    return out


def range_errors(args: argparse.Namespace, classes) -> list[str]:
    """One message per flag of ``classes`` outside its range, naming the flag and the range; and
    per float flag given NaN or +-inf (no flag means anything by them). A None value (flag not
    given) is never checked."""
    limits, names, errors = ranges(classes), flag_names(classes), []
    for dest, value in vars(args).items():
        if value is None or isinstance(value, (bool, str, list, tuple)):
            continue
        name = names.get(dest, "--" + dest.replace("_", "-"))
        if dest in limits and not limits[dest].contains(value):
            errors.append(f"{name} {value} is out of range {limits[dest]}")
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{name} {value} must be a finite number")
    return errors
