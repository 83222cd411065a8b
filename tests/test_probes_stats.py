"""probes.run on tiny Qwen3.5-style and Falcon-H1 models against plain autograd weight gradients."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import probes
from probes import ProbeError, ProbeSettings
from probes.testing import linear_names, random_batches, tiny_model

FAST = ProbeSettings(progress=False, max_rank=8)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen3_5", layers=2)  # one GatedDeltaNet layer, one attention layer


@pytest.fixture(scope="module")
def falcon():
    return tiny_model("falcon_h1", layers=2)


def _capture(src: torch.Tensor, dst: torch.Tensor, k: int) -> np.ndarray:
    """‖P_U_r dst P_V_r‖² / ‖dst‖² from a full SVD of src, r = 1..k (independent of probes.spectra)."""
    u, _, vh = torch.linalg.svd(src)
    a = u[:, :k].T @ dst @ vh[:k].T
    return np.array([float(a[:r, :r].square().sum() / dst.square().sum()) for r in range(1, k + 1)])


def reference(model: nn.Module, batches, names, k: int) -> dict[str, dict]:
    """Statistics from ordinary autograd: weights require grad on a copy, G_b read from ``.grad``."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(True)
    mods = dict(ref.named_modules())
    grads = {n: [] for n in names}
    moments = {n: [0.0, 0] for n in names}

    def keep_input(name, module, args, output, mask):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])[mask.reshape(-1).bool()]
        moments[name][0] = moments[name][0] + x.T @ x
        moments[name][1] += x.shape[0]

    for batch in batches:
        ref.zero_grad(set_to_none=True)
        handles = [
            mods[n].register_forward_hook(
                lambda m, a, o, n=n, b=batch: keep_input(n, m, a, o, b["attention_mask"])
            )
            for n in names
        ]
        out = ref(**batch, use_cache=False)
        (out["loss"] if isinstance(out, dict) else out.loss).backward()
        for h in handles:
            h.remove()
        for n in names:
            grads[n].append(mods[n].weight.grad.double().clone())
    out = {}
    for n in names:
        gs = grads[n]
        even, odd = sum(gs[0::2]), sum(gs[1::2])
        kk = min(k, *gs[0].shape)
        c, n_tok = moments[n]
        out[n] = {
            "grad_norm_sum": sum(float(g.norm()) for g in gs),
            "grad_sq_sum": sum(float(g.norm()) ** 2 for g in gs),
            "grad_singular_values": torch.linalg.svdvals(even + odd)[:kk].numpy(),
            "heldout_capture": 0.5 * (_capture(even, odd, kk) + _capture(odd, even, kk)),
            "act_eigenvalues": torch.linalg.eigvalsh(c / n_tok).flip(0).numpy(),
            "n_tokens": n_tok,
        }
    return out


@pytest.mark.parametrize("family", ["qwen", "falcon"])
def test_grad_and_activation_stats_equal_autograd_reference(family, qwen, falcon):
    model = {"qwen": qwen, "falcon": falcon}[family]
    batches = random_batches(4, pad_last=6, seed=1)
    names = linear_names(model)
    report = probes.run(model, batches, names, FAST)
    ref = reference(model, batches, names, FAST.max_rank)
    for n in names:
        got, want = report[n], ref[n]
        assert got.status == "ok" and got.n_batches == 4 and got.n_calls == 4
        assert got.n_tokens == want["n_tokens"] == 4 * 64 - 4 * 6
        assert math.isclose(got.grad_norm_sum, want["grad_norm_sum"], rel_tol=1e-4), n
        assert math.isclose(got.grad_sq_sum, want["grad_sq_sum"], rel_tol=1e-4), n
        assert math.isclose(got.fisher_trace, want["grad_sq_sum"] / 4, rel_tol=1e-4), n
        sv = want["grad_singular_values"]
        np.testing.assert_allclose(got.grad_singular_values, sv, rtol=0, atol=1e-4 * sv[0], err_msg=n)
        np.testing.assert_allclose(got.heldout_capture, want["heldout_capture"], atol=2e-3, err_msg=n)
        ev = want["act_eigenvalues"]
        np.testing.assert_allclose(got.act_eigenvalues, ev, rtol=0, atol=1e-4 * ev[0], err_msg=n)
        assert math.isclose(got.act_trace, ev.sum(), rel_tol=1e-4)


def test_weights_bit_identical_and_model_state_restored(qwen):
    before = {k: v.clone() for k, v in qwen.state_dict().items()}
    flags = {n: p.requires_grad for n, p in qwen.named_parameters()}
    qwen.train()
    probes.run(qwen, random_batches(2), linear_names(qwen), FAST)
    assert qwen.training
    qwen.eval()
    after = qwen.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n: p.requires_grad for n, p in qwen.named_parameters()} == flags
    assert all(p.grad is None for p in qwen.parameters())


def test_heldout_capture_and_spectra_are_well_formed(falcon):
    report = probes.run(falcon, random_batches(4), linear_names(falcon), FAST)
    for stats in report.modules.values():
        cap = stats.heldout_capture
        assert cap.size == min(8, stats.d_in, stats.d_out)
        assert np.all(np.diff(cap) >= -1e-12) and cap.min() >= 0 and cap.max() <= 1
        assert np.all(np.diff(stats.grad_singular_values) <= 1e-12)
        assert np.all(np.diff(stats.act_eigenvalues) <= 1e-12)
        assert stats.act_eigenvalues.size == stats.d_in
        assert 1 <= stats.act_effective_rank <= stats.d_in
        assert stats.act_explained_variance[-1] == pytest.approx(1.0, abs=1e-6)
        assert 0 < stats.grad_energy_curve[-1] <= 1
        assert stats.rank_for_variance(1.0) <= stats.d_in


def test_qkv_read_one_input_and_share_its_moment(qwen):
    report = probes.run(qwen, random_batches(2), linear_names(qwen), FAST)
    q, k, v = (report[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert np.array_equal(q.act_eigenvalues, k.act_eigenvalues) and np.array_equal(
        q.act_eigenvalues, v.act_eigenvalues
    )


class ToyLM(nn.Module):
    """Embedding -> ``twice`` applied two times (two call sites of one weight) -> head; plus a dead branch."""

    def __init__(self, vocab=50, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.twice = nn.Linear(dim, dim)
        self.unused = nn.Linear(dim, dim)  # never called
        self.dead_end = nn.Linear(dim, dim)  # called, output discarded
        self.head = nn.Linear(dim, vocab)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, labels=None, attention_mask=None, **kwargs):
        h = self.embed(input_ids)
        self.dead_end(h)
        h = torch.tanh(self.twice(h))
        h = self.twice(h)
        logits = self.head(h)
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )
        return {"loss": loss, "logits": logits}


def test_module_called_twice_sums_both_call_sites_like_autograd():
    torch.manual_seed(0)
    toy = ToyLM()
    batches = random_batches(3, vocab=50, seq=12)
    report = probes.run(toy, batches, ["twice", "head"], FAST)
    assert report["twice"].n_calls == 6 and report["head"].n_calls == 3
    ref = reference(toy, batches, ["twice"], 8)["twice"]
    assert math.isclose(report["twice"].grad_sq_sum, ref["grad_sq_sum"], rel_tol=1e-5)
    np.testing.assert_allclose(report["twice"].grad_singular_values, ref["grad_singular_values"], rtol=1e-4)
    assert report["twice"].n_tokens == ref["n_tokens"] == 2 * 3 * 2 * 12  # rows of X over both calls
    np.testing.assert_allclose(report["twice"].act_eigenvalues, ref["act_eigenvalues"], rtol=1e-4, atol=1e-8)


def test_dead_modules_are_reported_not_zeroed():
    toy = ToyLM()
    report = probes.run(toy, random_batches(2, vocab=50, seq=8), ["unused", "dead_end", "head"], FAST)
    assert report["unused"].status == "no_input" and report["unused"].n_calls == 0
    dead = report["dead_end"]
    assert dead.status == "no_gradient" and dead.n_calls == 2
    assert math.isnan(dead.grad_norm_sum) and dead.grad_singular_values.size == 0
    assert dead.act_eigenvalues.size == 16  # it ran: the input spectrum is known
    assert report["head"].status == "ok"


def test_nonfinite_loss_raises_naming_batch_or_is_skipped():
    toy = ToyLM()
    batches = random_batches(3, vocab=50, seq=8)
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] == 2 else None

    handle = toy.head.register_forward_hook(poison)
    with pytest.raises(ProbeError, match="batch 1"):
        probes.run(toy, batches, ["twice"], FAST)
    calls["n"] = 0
    report = probes.run(toy, batches, ["twice", "head"], ProbeSettings(progress=False, skip_nonfinite=True))
    handle.remove()
    assert report.meta["n_skipped"] == 1
    assert report["twice"].n_batches == 2 and report["twice"].status == "ok"
    assert report["twice"].heldout_capture.size == 0  # both kept batches are even: no held-out half


def test_nonfinite_statistics_give_nonfinite_status_not_zero():
    toy = ToyLM()
    with torch.no_grad():
        # finite, but XᵀX overflows float32; tanh saturates so the loss stays finite
        toy.embed.weight[:] = 1e30
    report = probes.run(toy, random_batches(2, vocab=50, seq=8), ["dead_end", "head"], FAST)
    assert report["dead_end"].status == "nonfinite" and math.isnan(report["dead_end"].grad_sq_sum)
    assert report["head"].status == "ok"


def test_gradient_checkpointing_gives_the_same_stats(qwen):
    batches = random_batches(2, seed=3)
    names = linear_names(qwen)[:6]
    plain = probes.run(qwen, batches, names, FAST)
    calls = []
    handle = dict(qwen.named_modules())[names[0]].register_forward_hook(lambda *a: calls.append(1))
    ckpt = probes.run(
        qwen, batches, names, ProbeSettings(progress=False, max_rank=8, gradient_checkpointing=True)
    )
    handle.remove()
    assert len(calls) == 2 * len(batches)  # the layer really was recomputed in backward
    for n in names:
        assert ckpt[n].n_calls == plain[n].n_calls
        assert math.isclose(ckpt[n].grad_sq_sum, plain[n].grad_sq_sum, rel_tol=1e-5)
        np.testing.assert_allclose(ckpt[n].act_eigenvalues, plain[n].act_eigenvalues, rtol=1e-5, atol=1e-9)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in qwen.modules())


def test_sketched_input_moment_bounds_the_exact_one(qwen):
    name = "model.layers.1.mlp.down_proj"  # d_in = 128
    batches = random_batches(3)
    exact = probes.run(qwen, batches, [name], FAST)[name]
    sketch = probes.run(
        qwen, batches, [name], ProbeSettings(progress=False, sketch_threshold=64, sketch_dim=48)
    )[name]
    assert sketch.act_sketched and not exact.act_sketched and sketch.act_eigenvalues.size == 48
    assert math.isclose(sketch.act_trace, exact.act_trace, rel_tol=1e-5)
    assert np.all(sketch.act_eigenvalues <= exact.act_eigenvalues[:48] * (1 + 1e-4) + 1e-9)
    assert sketch.act_eigenvalues[0] >= 0.8 * exact.act_eigenvalues[0]  # flat random-init spectrum: loose
    assert math.isclose(sketch.grad_sq_sum, exact.grad_sq_sum, rel_tol=1e-6)


@pytest.mark.parametrize(
    ("modules", "match"),
    [
        (["model.layers.0.nope"], "not in the model"),
        (["model.layers.0.mlp"], "only torch.nn.Linear"),
        ([], "non-empty"),
        ("lm_head", "non-empty"),
    ],
)
def test_bad_module_names_are_refused(qwen, modules, match):
    with pytest.raises(ProbeError, match=match):
        probes.run(qwen, random_batches(1), modules, FAST)


def test_modules_without_weights_in_memory_are_refused():
    with torch.device("meta"):
        toy = ToyLM()
    with pytest.raises(ProbeError, match="meta device"):
        probes.run(toy, random_batches(1, vocab=50, seq=8), ["twice"], FAST)


def test_batches_with_every_label_masked_are_refused(qwen):
    batch = random_batches(1)[0]
    batch["labels"][:] = -100
    with pytest.raises(ProbeError, match="batch 0 has every label masked"):
        probes.run(qwen, [batch], ["lm_head"], FAST)


def test_randomized_svd_setting_agrees_with_exact(falcon):
    batches, names = random_batches(4, seed=2), linear_names(falcon)
    exact = probes.run(falcon, batches, names, ProbeSettings(progress=False, max_rank=8, svd="exact"))
    rand = probes.run(
        falcon, batches, names, ProbeSettings(progress=False, max_rank=8, svd="randomized", svd_oversample=8)
    )
    for n in names:
        e, r = exact[n], rand[n]
        np.testing.assert_allclose(
            r.grad_singular_values[:4], e.grad_singular_values[:4], rtol=1e-2, err_msg=n
        )
        np.testing.assert_allclose(r.heldout_capture[:4], e.heldout_capture[:4], atol=2e-2, err_msg=n)
        # BLAS sums may differ in the last bits
        assert r.grad_sq_sum == pytest.approx(e.grad_sq_sum, rel=1e-6)
        np.testing.assert_allclose(
            r.act_eigenvalues, e.act_eigenvalues, rtol=1e-4, atol=1e-6 * e.act_eigenvalues[0]
        )


def test_progress_bar_runs_and_changes_nothing(qwen, capsys):
    batches, names = random_batches(2), linear_names(qwen)[:3]
    quiet = probes.run(qwen, batches, names, FAST)
    loud = probes.run(qwen, batches, names, ProbeSettings(progress=True, max_rank=8))
    assert "probing" in capsys.readouterr().err
    for n in names:  # equal up to BLAS rounding (MKL results may depend on buffer alignment)
        np.testing.assert_allclose(quiet[n].grad_singular_values, loud[n].grad_singular_values, rtol=1e-5)
        np.testing.assert_allclose(
            quiet[n].act_eigenvalues,
            loud[n].act_eigenvalues,
            rtol=1e-4,
            atol=1e-6 * quiet[n].act_eigenvalues[0],
        )


def test_bf16_model_accumulates_in_fp32(qwen):
    model = copy.deepcopy(qwen).to(torch.bfloat16)
    names = linear_names(model)[:4]
    report = probes.run(model, random_batches(2), names, FAST)
    assert all(report[n].status == "ok" and np.isfinite(report[n].grad_sq_sum) for n in names)
    assert report.meta["model_dtype"] == "bfloat16"
