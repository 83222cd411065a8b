"""Every numeric settings field declares the values it accepts, and NaN, inf and out-of-range values are
refused at construction, before any work (issue 12: --alpha-ratio nan once wrote NaN into
adapter_config.json)."""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing

import pytest

from allocator.errors import InputError
from allocator.output.settings import LoraSettings
from allocator.scoring.utility import UtilitySettings
from allocator.solver.settings import SolverSettings
from allocator.tuning import TuneSettings
from probes.errors import ProbeError
from probes.settings import DataSettings, ProbeSettings, Range

SETTINGS = (DataSettings, ProbeSettings, UtilitySettings, SolverSettings, TuneSettings, LoraSettings)
ERRORS = (InputError, ProbeError)


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if hint in (int, float) or any(a in (int, float) for a in typing.get_args(hint)):
            yield f


def _bad_values(spec: Range) -> list:
    bad = [math.nan, math.inf, -math.inf]
    if spec.lo > -math.inf:
        bad.append(spec.lo if spec.lo_open else spec.lo - 1)
    if spec.hi < math.inf:
        bad.append(spec.hi if spec.hi_open else spec.hi + 1)
    if spec.integer:
        bad.append(max(spec.lo, 0) + 1.5)
    return bad


CASES = [(cls, f) for cls in SETTINGS for f in _numeric_fields(cls)]


def test_every_numeric_settings_field_declares_its_range():
    assert len(CASES) >= 30  # the walk really walks
    missing = [
        f"{cls.__name__}.{f.name}" for cls, f in CASES if not isinstance(f.metadata.get("range"), Range)
    ]
    assert missing == []


@pytest.mark.parametrize("cls, f", CASES, ids=[f"{c.__name__}.{f.name}" for c, f in CASES])
def test_nan_inf_and_out_of_range_values_are_refused(cls, f):
    spec = f.metadata["range"]
    default = cls()
    current = getattr(default, f.name)
    for bad in _bad_values(spec):
        if isinstance(current, dict):
            value = {next(iter(current), "gradient_spectrum" if "weight" in f.name else "mlp"): bad}
        elif isinstance(current, tuple):
            value = (*current, bad)
        else:
            value = bad
        with pytest.raises(ERRORS, match=rf"{cls.__name__}\.{f.name} must be"):
            cls(**{f.name: value})
    assert isinstance(current, (numbers.Real, dict, tuple))  # the default itself was accepted


@pytest.mark.parametrize("cls, f", CASES, ids=[f"{c.__name__}.{f.name}" for c, f in CASES])
def test_in_range_edges_are_accepted(cls, f):
    spec = f.metadata["range"]
    if isinstance(getattr(cls(), f.name), (dict, tuple)) or f.name in ("sketch_dim", "sketch_threshold"):
        pytest.skip("container or cross-field checked field: its edges are covered by its own tests")
    edge = spec.lo if not spec.lo_open else (spec.lo + 1 if spec.integer else spec.lo + 1e-9)
    if f.name == "grace_period":
        edge = max(edge, TuneSettings().heartbeat_interval)
    if cls is TuneSettings and f.name == "trials":
        edge = len(TuneSettings().baselines) + 1
    assert getattr(cls(**{f.name: edge}), f.name) == edge
