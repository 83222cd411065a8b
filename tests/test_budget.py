"""Budget parsing and the one cost function."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from allocator.discovery.component import Component
from allocator.errors import InputError
from allocator.solver.budget import Budget, lora_params, params_per_uniform_rank, uniform_rank_equivalent


def _components() -> list[Component]:
    return [
        Component("a.q", 0, "attention", "softmax", 64, 64, "Linear"),
        # narrow: r16 still counts 16*(64+4), as PEFT
        Component("a.k", 0, "attention", "softmax", 64, 4, "Linear"),
        Component("m.up", 0, "mlp", "dense", 64, 256, "Linear"),
        Component("e.w", 0, "moe", "expert", 64, 128, "Param", is_parameter=True, n_experts=4),
        Component("x.out", 0, "recurrent", "mamba2", 128, 64, "Linear", lora_effective=False, note="fused"),
        Component("r.gate", 0, "moe", "router", 64, 4, "Linear", default_target=False),
        Component("t.q", 1, "attention", "softmax", 64, 64, "Linear", tied_to="a.q"),
    ]


def test_lora_params_counts_a_and_b_per_expert():
    assert lora_params(1024, 4096, 8) == 8 * 1024 + 4096 * 8
    assert lora_params(64, 32, 4, n_experts=8) == 8 * 4 * 96
    assert lora_params(64, 32, 0) == 0


def test_lora_params_rejects_negative_sizes():
    with pytest.raises(InputError, match="non-negative"):
        lora_params(64, 32, -1)


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("2.5M", "params", 2_500_000),
        ("2500000", "params", 2_500_000),
        ("2_500_000", "params", 2_500_000),
        ("800k", "params", 800_000),
        ("800K", "params", 800_000),
        ("1.2B", "params", 1_200_000_000),
        ("2.3k", "params", 2_300),  # exact decimal, not 2299
        ("2.5e6", "params", 2_500_000),
        (" 0.5% ", "fraction", 0.005),
        ("100%", "fraction", 1.0),
        ("r16", "uniform_rank", 16),
        ("R8", "uniform_rank", 8),
    ],
)
def test_budget_parse_accepted_forms(text, kind, value):
    b = Budget.parse(text)
    assert (b.kind, b.value) == (kind, value)
    assert str(b) == text.strip()


def test_budget_parse_int_and_budget_pass_through():
    assert Budget.parse(1234).value == 1234
    b = Budget.parse("r4")
    assert Budget.parse(b) is b


@pytest.mark.parametrize(
    "text", ["abc", "", "-5", "2.5X", "r", "r-4", "1e", "%", "M", "r4.5", None, 2.5, True]
)
def test_budget_parse_rejects_with_accepted_forms(text):
    with pytest.raises(InputError, match=r"2\.5M.*0\.5%.*r16"):
        Budget.parse(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0", "must be positive"),
        ("r0", "must be positive"),
        ("0%", "must be positive"),
        ("150%", "up to 100%"),
        ("1.5", "did you mean 1.5M or 1.5%"),
        ("1.2345k", "whole number"),
    ],
)
def test_budget_parse_errors_name_the_fix(text, message):
    with pytest.raises(InputError, match=message):
        Budget.parse(text)


def test_uniform_rank_budget_is_what_peft_counts_uncapped_over_eligible_targets():
    comps = _components()
    per_rank = (64 + 64) + (64 + 4) + (64 + 256) + 4 * (64 + 128)  # not the fused, router or tied ones
    assert params_per_uniform_rank(comps) == per_rank
    assert Budget.parse("r16").resolve(comps) == 16 * per_rank
    assert uniform_rank_equivalent(16 * per_rank, comps) == 16


def test_fraction_budget_needs_base_params_and_floors():
    assert Budget.parse("0.5%").resolve([], 1_000_000_007) == 5_000_000
    with pytest.raises(InputError, match="n_base_params"):
        Budget.parse("0.5%").resolve([])
    with pytest.raises(InputError, match="resolves to 0"):
        Budget.parse("0.0001%").resolve([], 1000)


def test_uniform_budget_without_eligible_targets_is_an_error():
    with pytest.raises(InputError, match="no"):
        Budget.parse("r8").resolve([c for c in _components() if not c.eligible])


def test_budget_dict_round_trip():
    for text in ("2.5M", "0.5%", "r16"):
        b = Budget.parse(text)
        assert Budget.from_dict(b.to_dict()) == b
    with pytest.raises(InputError, match="unknown Budget fields"):
        Budget.from_dict({"text": "r4", "extra": 1})


@given(st.integers(min_value=1, max_value=10**12))
def test_budget_parse_plain_counts_round_trip(n):
    assert Budget.parse(str(n)).resolve([]) == n
    assert Budget.parse(f"{n:_}").resolve([]) == n


@given(st.integers(1, 4096), st.integers(1, 4096), st.integers(0, 512), st.integers(1, 64))
def test_lora_params_is_linear_in_rank_and_experts(d_in, d_out, r, e):
    assert (
        lora_params(d_in, d_out, r, e)
        == r * lora_params(d_in, d_out, 1, e)
        == e * lora_params(d_in, d_out, r)
    )
