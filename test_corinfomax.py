"""Tests of corinfomax.py, train.py and evaluate.py against independent oracles.

Equation numbers are those of the corinfomax module docstring (design/equations.md):

- dynamics (6)-(10): one and two relaxation iterations of a [2, 3, 2] network, for every
  mix of sparse and bounded layers, against the equations written out element by element
  in plain Python; the step-size rules; the interneuron (9) against its closed-form rest
  state. Both `relax` and the regrouped `relax_fast` are held to the same numbers;
- learning (11)-(13): weight and lateral updates against per-sample outer products summed
  in a Python loop; the exact lateral update against a dense matrix inverse, and the
  first-order one against that inverse as gamma shrinks;
- a whole step (plain, fast, and train.py's GraphedStep without capture) against the
  phases composed by hand from the spec, with the third phase and random signs (14);
- evaluation against each sample relaxed alone; learning on synthetic clusters;
- train.py and evaluate.py end to end on tiny data sets written in temporary folders
  (never the network), and the input checks;
- runs: the same seed twice and a resumed run against a straight one, bit for bit; an
  interrupted save and an injected divergence against the checkpoint bytes saved before;
  every bad input against one line of stderr; evaluation against each sample scored alone.

CPU only (plus CUDA cases when a GPU is present), seeded, float64 where precision matters.
"""

import json
import math
import pickle
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import benchmark
import corinfomax as cim
import evaluate as evaluate_cli
import train

F64 = torch.float64


def make_model(sizes, types, seed=0, **kw):
    """A float64 network with small per-layer learning rates unless overridden."""
    P = len(sizes) - 1
    kw.setdefault("lr_ff", [0.3, 0.2, 0.1][:P])
    kw.setdefault("lr_fb", [0.07, 0.05][:P - 1])
    kw.setdefault("q_lr", [0.01] * P)
    cfg = cim.Config(sizes=sizes, layer_types=types, **kw)
    return cim.CorInfoMax(cfg, seed=seed, dtype=F64)


def random_rates(sizes, m, seed):
    """Two phases of rates [x, r_1, ..., r_P] sharing the input x, as train_step has them."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sizes[0], m, generator=gen, dtype=F64)
    rf = [x] + [torch.rand(n, m, generator=gen, dtype=F64) for n in sizes[1:]]
    rn = [x] + [torch.rand(n, m, generator=gen, dtype=F64) for n in sizes[1:]]
    return rf, rn


# ----------------------------------------------------------------------------------------
# Neural dynamics, Eqs. 6-10, worked element by element
# ----------------------------------------------------------------------------------------

# A [2, 3, 2] network: hidden layer 1 (3 neurons), output layer 2 (2 neurons), 2 samples.
EPS, G, LAM, ETA0 = 0.5, 0.2, 0.8, 0.3
GAMMA = (1 - LAM) / LAM  # 0.25
Q_LR = [0.5, 0.4]
DRIVE = [[2.0, -3.0], [0.5, 1.5], [-1.0, 4.0]]  # W_ff[0] x, (3, 2)
R1 = [[0.3, 0.0], [0.6, 0.9], [0.1, 0.4]]
R2 = [[0.2, 0.7], [0.5, 0.0]]
Q1, Q2 = [0.3, 0.1], [0.2, 0.05]  # interneurons of sparse layers (bounded: zero)
W_FF1 = [[0.5, -0.4, 2.5], [-0.9, 0.8, 0.6]]
W_FB1 = [[0.7, -0.2], [0.1, 0.9], [-0.5, 0.4]]
B1 = [[1.2, 0.1, -0.2], [0.1, 0.9, 0.3], [-0.2, 0.3, 1.5]]
B2 = [[0.8, -0.1], [-0.1, 1.1]]
Y = [[0.0, 1.0], [1.0, 0.0]]  # labels 1 and 0 as one-hot columns


def rate(u, kind):
    """Eq. 8: relu for a sparse layer, clip to [0, 1] for a bounded one."""
    return max(u, 0.0) if kind == "sparse" else min(max(u, 0.0), 1.0)


def hand_relax(types, etas, beta):
    """Eqs. 6-9 in plain Python, one sample (column j) and one neuron (i) at a time."""
    out_r1 = [[0.0, 0.0] for _ in range(3)]
    out_r2 = [[0.0, 0.0] for _ in range(2)]
    out_q1, out_q2 = [], []
    for j in range(2):
        r1 = [R1[i][j] for i in range(3)]
        r2 = [R2[i][j] for i in range(2)]
        q1 = Q1[j] if types[0] == "sparse" else 0.0
        q2 = Q2[j] if types[1] == "sparse" else 0.0
        u1, u2, a1, a2 = r1[:], r2[:], q1, q2  # a phase starts with u = r and a = q
        for eta in etas:
            # Eq. 6, hidden layer, every neuron from the rates before this iteration.
            new_u1 = []
            for i in range(3):
                basal = DRIVE[i][j]
                b_r = B1[i][0] * r1[0] + B1[i][1] * r1[1] + B1[i][2] * r1[2]
                top_down = W_FB1[i][0] * r2[0] + W_FB1[i][1] * r2[1]
                apical = EPS * (2 * GAMMA * b_r + G * r1[i] - q1) + top_down
                du = -G * u1[i] + (basal - u1[i]) / EPS + (apical - u1[i]) / EPS
                new_u1.append(u1[i] + eta * du)
            u1 = new_u1
            r1 = [rate(v, types[0]) for v in u1]
            if types[0] == "sparse":  # Eq. 9
                a1 = a1 + Q_LR[0] * (-a1 + (r1[0] + r1[1] + r1[2] - 1) + q1)
                q1 = max(a1, 0.0)
            # Eq. 7, output layer, from the new hidden rates.
            new_u2 = []
            for i in range(2):
                basal = W_FF1[i][0] * r1[0] + W_FF1[i][1] * r1[1] + W_FF1[i][2] * r1[2]
                b_r = B2[i][0] * r2[0] + B2[i][1] * r2[1]
                apical = GAMMA * b_r + G * r2[i] - q2 - beta * (r2[i] - Y[i][j])
                du = -G * u2[i] + (basal - u2[i]) / EPS + (apical - u2[i])
                new_u2.append(u2[i] + eta * du)
            u2 = new_u2
            r2 = [rate(v, types[1]) for v in u2]
            if types[1] == "sparse":
                a2 = a2 + Q_LR[1] * (-a2 + (r2[0] + r2[1] - 1) + q2)
                q2 = max(a2, 0.0)
        for i in range(3):
            out_r1[i][j] = r1[i]
        for i in range(2):
            out_r2[i][j] = r2[i]
        out_q1.append(q1)
        out_q2.append(q2)
    return out_r1, out_r2, [out_q1], [out_q2]


def relax_explicit_network(types, steps, beta, relax, rule="constant"):
    cfg = cim.Config(sizes=[2, 3, 2], layer_types=list(types), lr_ff=[0.1, 0.1],
                     lr_fb=[0.1], q_lr=Q_LR, lam=LAM, eps=EPS, g=G, neural_lr=ETA0,
                     neural_lr_rule=rule)
    model = cim.CorInfoMax(cfg, dtype=F64)

    def t(rows):
        return torch.tensor(rows, dtype=F64)

    model.W_ff_1.copy_(t(W_FF1))
    model.W_fb_1.copy_(t(W_FB1))
    model.B_1.copy_(t(B1))
    model.B_2.copy_(t(B2))
    q1 = t([Q1]) if types[0] == "sparse" else torch.zeros(1, 2, dtype=F64)
    q2 = t([Q2]) if types[1] == "sparse" else torch.zeros(1, 2, dtype=F64)
    r, q = [None, t(R1), t(R2)], [None, q1, q2]
    return getattr(model, relax)(t(DRIVE), r, q, beta, t(Y), steps)[:2]


LAYER_TYPE_PAIRS = [("sparse", "sparse"), ("sparse", "bounded"), ("bounded", "sparse"),
                    ("bounded", "bounded")]
RELAXERS = ["relax", "relax_fast"]  # the plain form and the regrouped one must agree


@pytest.mark.parametrize("relax", RELAXERS)
@pytest.mark.parametrize("types", LAYER_TYPE_PAIRS, ids="-".join)
def test_one_relaxation_iteration_matches_hand_computation(types, relax):
    r, q = relax_explicit_network(types, steps=1, beta=0.7, relax=relax)
    e_r1, e_r2, e_q1, e_q2 = hand_relax(types, [ETA0], beta=0.7)
    # The numbers reach both edges of each layer's domain (u < 0, and u > 1: clipped in a
    # bounded layer, kept in a sparse one) and move every sparse layer's interneuron.
    for kind, rates, q_start, q_end in ((types[0], e_r1, Q1, e_q1), (types[1], e_r2, Q2, e_q2)):
        flat = [v for row in rates for v in row]
        assert 0.0 in flat and (1.0 in flat if kind == "bounded" else max(flat) > 1.0)
        assert kind == "bounded" or q_end[0] != q_start
    torch.testing.assert_close(r[1], torch.tensor(e_r1, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r[2], torch.tensor(e_r2, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[1], torch.tensor(e_q1, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[2], torch.tensor(e_q2, dtype=F64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("relax", RELAXERS)
@pytest.mark.parametrize("types", LAYER_TYPE_PAIRS, ids="-".join)
def test_two_iterations_with_decaying_step_match_hand_computation(types, relax):
    # divide_by_loop_index: eta_0 = 0.3, eta_1 = 0.15; u and a carry over between them.
    r, q = relax_explicit_network(types, steps=2, beta=-0.6, relax=relax,
                                  rule="divide_by_loop_index")
    e_r1, e_r2, e_q1, e_q2 = hand_relax(types, [ETA0, ETA0 / 2], beta=-0.6)
    torch.testing.assert_close(r[1], torch.tensor(e_r1, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r[2], torch.tensor(e_r2, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[1], torch.tensor(e_q1, dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[2], torch.tensor(e_q2, dtype=F64), rtol=1e-12, atol=1e-12)


def test_step_size_rules():
    def cfg(rule):
        return cim.Config(sizes=[2, 2], layer_types=["bounded"], lr_ff=[0.1], lr_fb=[],
                          neural_lr=0.5, neural_lr_stop=0.01, neural_lr_rule=rule)

    steps = [cim.neural_step_size(cfg("constant"), s) for s in (0, 7, 500)]
    assert steps == [0.5, 0.5, 0.5]
    steps = [cim.neural_step_size(cfg("divide_by_loop_index"), s) for s in (0, 1, 9, 99)]
    assert steps == pytest.approx([0.5, 0.25, 0.05, 0.01])  # 0.005 is floored at 0.01
    steps = [cim.neural_step_size(cfg("divide_by_slow_loop_index"), s) for s in (0, 100, 9900)]
    assert steps == pytest.approx([0.5, 0.25, 0.01])  # 0.5 / 100 = 0.005 -> 0.01


@pytest.mark.parametrize("third", ["sparse", "bounded"])
def test_relax_fast_returns_the_products_of_its_final_rates(third):
    # ff[k] = W_ff[k-1] r_{k-1} (ff[1] the drive), fb[k] = W_fb[k] r_{k+1}, lat[k] = B[k] r_k,
    # against dense products of the returned rates; and a second phase started from them
    # follows the plain `relax`.
    model = make_model([6, 5, 4, 3], ["sparse", "bounded", third], seed=6, q_lr=[0.2] * 3)
    gen = torch.Generator().manual_seed(6)
    drive = torch.rand(5, 3, generator=gen, dtype=F64) * 3
    y = torch.eye(3, dtype=F64)[[0, 2, 1]].T
    r, q = model.zero_state(3)
    r, q, (ff, fb, lat) = model.relax_fast(drive, r, q, 0.0, None, 4)
    torch.testing.assert_close(ff[1], drive, rtol=0, atol=0)
    for k in (2, 3):
        torch.testing.assert_close(ff[k], model.W_ff[k - 1] @ r[k - 1], rtol=1e-12, atol=1e-12)
    for k in (1, 2):
        torch.testing.assert_close(fb[k], model.W_fb[k] @ r[k + 1], rtol=1e-12, atol=1e-12)
    for k in (1, 2, 3):
        torch.testing.assert_close(lat[k], model.B[k] @ r[k], rtol=1e-12, atol=1e-12)
    assert all(rk.abs().sum() > 0 for rk in r[1:])  # no layer silent: the products mean it
    carried, q_carried, _ = model.relax_fast(drive, r, q, 0.5, y, 3, inputs=(fb, lat))
    plain, q_plain = model.relax(drive, list(r), list(q), 0.5, y, 3)
    for k in (1, 2, 3):
        torch.testing.assert_close(carried[k], plain[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(q_carried[k], q_plain[k], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# Interneuron, Eq. 9
# ----------------------------------------------------------------------------------------

STRONG_DRIVE = [[2.0, 5.0, 10.0], [3.0, 4.0, 8.0], [1.5, 6.0, 9.0], [2.5, 5.5, 12.0]]


@pytest.mark.parametrize("relax", RELAXERS)
@pytest.mark.parametrize("sizes", [[3, 4, 2], [3, 4]], ids=["hidden", "output"])
def test_interneuron_brings_l1_norm_to_one(sizes, relax):
    P = len(sizes) - 1
    drive = torch.tensor(STRONG_DRIVE, dtype=F64)  # (4, 3): large and positive
    sums = {}
    for q_lr in (0.0, 0.1):
        model = make_model(sizes, ["sparse"] * P, q_lr=[q_lr] * P, neural_lr=0.03)
        r, q = model.zero_state(3)
        r, q = getattr(model, relax)(drive, r, q, 0.0, None, 1500)[:2]
        sums[q_lr] = r[1].sum(0)
    assert (sums[0.0] > 4).all()  # without the interneuron the layer is far above 1
    torch.testing.assert_close(sums[0.1], torch.ones(3, dtype=F64), rtol=0, atol=1e-3)


def test_interneuron_steady_state_matches_closed_form():
    # One sparse output layer, gamma ~ 0: at rest, for an active neuron (r = u),
    # 0 = -g u + (d - u) / eps + (g u - q - u), so u = (d / eps - q) / (1 / eps + 1), and
    # sum over the active set = 1 gives q = (sum_active d / eps - (1 / eps + 1)) / n_active.
    eps = 0.15
    model = make_model([3, 4], ["sparse"], q_lr=[0.1], neural_lr=0.03, lam=1 - 1e-12, eps=eps)
    r, q = model.zero_state(3)
    r, q = model.relax(torch.tensor(STRONG_DRIVE, dtype=F64), r, q, 0.0, None, 2000)
    c = 1 / eps + 1
    expected_q = [(3.0 / eps + 2.5 / eps - c) / 2,  # neurons 1 and 3 active (drive 3, 2.5)
                  (6.0 / eps + 5.5 / eps - c) / 2,  # neurons 2 and 3 (drive 6, 5.5)
                  (12.0 / eps - c) / 1]  # neuron 3 alone (drive 12)
    torch.testing.assert_close(q[1][0], torch.tensor(expected_q, dtype=F64), rtol=1e-6,
                               atol=0)
    active = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(r[1] > 0, active)


# ----------------------------------------------------------------------------------------
# Learning rules, Eqs. 11-13
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_drive", [False, True])
def test_weight_updates_equal_mean_of_per_sample_outer_products(with_drive):
    sizes, m, beta = [4, 3, 5, 2], 6, -0.8
    model = make_model(sizes, ["sparse", "bounded", "sparse"])
    rf, rn = random_rates(sizes, m, seed=1)
    W_ff = [w.clone() for w in model.W_ff]
    W_fb = [None] + [w.clone() for w in model.W_fb[1:]]
    lr_ff, lr_fb = model.cfg.lr_ff, model.cfg.lr_fb

    expected_ff = []
    for k in range(3):  # Eq. 11, one sample at a time
        total = torch.zeros_like(W_ff[k])
        for i in range(m):
            e_n = rn[k + 1][:, i] - W_ff[k] @ rn[k][:, i]
            e_f = rf[k + 1][:, i] - W_ff[k] @ rf[k][:, i]
            total += torch.outer(e_n, rn[k][:, i]) - torch.outer(e_f, rf[k][:, i])
        expected_ff.append(W_ff[k] + lr_ff[k] / beta * total / m)
    expected_fb = [None]
    for k in (1, 2):  # Eq. 12, one sample at a time
        total = torch.zeros_like(W_fb[k])
        for i in range(m):
            e_n = rn[k][:, i] - W_fb[k] @ rn[k + 1][:, i]
            e_f = rf[k][:, i] - W_fb[k] @ rf[k + 1][:, i]
            total += torch.outer(e_n, rn[k + 1][:, i]) - torch.outer(e_f, rf[k + 1][:, i])
        expected_fb.append(W_fb[k] + lr_fb[k - 1] / beta * total / m)

    drive = W_ff[0] @ rf[0] if with_drive else None
    model.update_weights(rf, rn, 1.0 / (beta * m), drive)
    for k in range(3):
        torch.testing.assert_close(model.W_ff[k], expected_ff[k], rtol=1e-12, atol=1e-12)
    for k in (1, 2):
        torch.testing.assert_close(model.W_fb[k], expected_fb[k], rtol=1e-12, atol=1e-12)


def test_first_order_lateral_update_equals_per_sample_loop():
    sizes, m, lam = [4, 3, 5, 2], 6, 0.9
    model = make_model(sizes, ["sparse"] * 3, lam=lam)
    _, rn = random_rates(sizes, m, seed=2)
    gamma = (1 - lam) / lam
    expected = [None]
    for k in range(1, 4):  # Eq. 13: B <- (B - gamma mean_i (B r_i)(B r_i)^T) / lam
        B = model.B[k].clone()
        total = torch.zeros_like(B)
        for i in range(m):
            z = B @ rn[k][:, i]
            total += torch.outer(z, z)
        expected.append((B - gamma * total / m) / lam)
    model.update_lateral(rn)
    for k in range(1, 4):
        torch.testing.assert_close(model.B[k], expected[k], rtol=1e-12, atol=1e-12)


def dense_lateral(B_old, r, lam):
    """The inverse of lam R + (1 - lam) / m r r^T with R = B_old^{-1}, by explicit inverses."""
    m = r.shape[1]
    return torch.linalg.inv(lam * torch.linalg.inv(B_old) + (1 - lam) / m * r @ r.T)


def lateral_after_update(sizes, rn, lam, exact):
    model = make_model(sizes, ["sparse"] * (len(sizes) - 1), lam=lam, exact_lateral=exact)
    before = [b.clone() for b in model.B[1:]]
    model.update_lateral(rn)
    return before, [b.clone() for b in model.B[1:]]


def test_exact_lateral_update_equals_dense_inverse():
    sizes, lam = [3, 4, 3], 0.9
    _, rn = random_rates(sizes, m=5, seed=3)
    before, after = lateral_after_update(sizes, rn, lam, exact=True)
    for k in range(2):
        expected = dense_lateral(before[k], rn[k + 1], lam)
        torch.testing.assert_close(after[k], expected, rtol=1e-10, atol=1e-10)


def test_first_order_lateral_update_approaches_dense_inverse_as_gamma_shrinks():
    sizes = [3, 4, 3]
    _, rn = random_rates(sizes, m=5, seed=3)
    gaps = []
    for lam in (0.99, 0.999, 0.9999):
        before, after = lateral_after_update(sizes, rn, lam, exact=False)
        gap = 0.0
        for k in range(2):
            expected = dense_lateral(before[k], rn[k + 1], lam)
            gap = max(gap, ((after[k] - expected).norm() / expected.norm()).item())
        gaps.append(gap)
    # The first-order form drops a term of order gamma^2: 100x smaller per decade of gamma.
    assert gaps[2] < 1e-6
    assert gaps[0] > 30 * gaps[1] > 900 * gaps[2]


# ----------------------------------------------------------------------------------------
# A whole training step, Eqs. 11-14
# ----------------------------------------------------------------------------------------

def reference_train_step(model, x, labels, beta, lr_scale=1.0):
    """What train_step must do, composed from the spec: free phase from rest, nudged phase
    from where it ended (then the optional -beta phase), Eqs. 11-13 as dense products.
    The dynamics come from model.relax, which the hand-worked cases check."""
    cfg, P, m = model.cfg, model.P, x.shape[1]
    y = torch.eye(cfg.sizes[-1], dtype=F64)[labels].T  # (N_P, m)
    drive = model.W_ff[0] @ x
    r = [None] + [torch.zeros(n, m, dtype=F64) for n in cfg.sizes[1:]]
    q = [None] + [torch.zeros(1, m, dtype=F64) for _ in range(P)]
    r, q = model.relax(drive, r, q, 0.0, None, cfg.t_free)
    free = [x] + [rk.clone() for rk in r[1:]]
    r, q = model.relax(drive, r, q, beta, y, cfg.t_nudged)
    rn = [x] + [rk.clone() for rk in r[1:]]
    rf, factor = free, lr_scale / (beta * m)
    if cfg.third_phase:
        r, q = model.relax(drive, r, q, -beta, y, cfg.t_nudged)
        rf, factor = [x] + [rk.clone() for rk in r[1:]], lr_scale / (2 * beta * m)
    W_ff, W_fb = model.W_ff, model.W_fb
    new_ff = [W_ff[k] + cfg.lr_ff[k] * factor
              * ((rn[k + 1] - W_ff[k] @ rn[k]) @ rn[k].T - (rf[k + 1] - W_ff[k] @ rf[k]) @ rf[k].T)
              for k in range(P)]
    new_fb = [W_fb[k] + cfg.lr_fb[k - 1] * factor
              * ((rn[k] - W_fb[k] @ rn[k + 1]) @ rn[k + 1].T
                 - (rf[k] - W_fb[k] @ rf[k + 1]) @ rf[k + 1].T)
              for k in range(1, P)]
    new_B = [(model.B[k] - cfg.gamma / m * (model.B[k] @ rn[k]) @ (model.B[k] @ rn[k]).T)
             / cfg.lam for k in range(1, P + 1)]
    return free, new_ff, new_fb, new_B


def train_step_model(third_phase):
    return make_model([5, 4, 3, 3], ["sparse", "bounded", "sparse"], seed=4, lam=0.9,
                      beta=0.5, random_sign=False, t_free=4, t_nudged=3, neural_lr=0.2,
                      q_lr=[0.3, 0.0, 0.2], third_phase=third_phase)


def run_step(model, kind, x, labels, lr_scale=1.0):
    """One training step by one of the three paths: plain, fast, and train.py's GraphedStep
    (which runs fast_step without CUDA graphs on a CPU)."""
    if kind == "graphed":
        return cim.GraphedStep(model, x.shape[1], capture=False)(x, labels, lr_scale)
    return model.train_step(x, labels, lr_scale, fast=kind == "fast")


STEP_KINDS = ["plain", "fast", "graphed"]


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("third_phase", [False, True])
def test_train_step_composes_phases_and_updates(third_phase, kind):
    model = train_step_model(third_phase)
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    labels = torch.tensor([2, 0, 1, 2])
    _, new_ff, new_fb, new_B = reference_train_step(train_step_model(third_phase), x,
                                                    labels, beta=0.5, lr_scale=0.7)
    run_step(model, kind, x, labels, lr_scale=0.7)
    for k in range(3):
        torch.testing.assert_close(model.W_ff[k], new_ff[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.B[k + 1], new_B[k], rtol=1e-12, atol=1e-12)
    for k in (1, 2):
        torch.testing.assert_close(model.W_fb[k], new_fb[k - 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("third_phase", [False, True])
def test_train_step_returns_free_phase_rates(third_phase, kind):
    # The docstrings promise the free-phase rates (train.py checks them for divergence).
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    labels = torch.tensor([2, 0, 1, 2])
    free, *_ = reference_train_step(train_step_model(third_phase), x, labels, beta=0.5)
    returned = run_step(train_step_model(third_phase), kind, x, labels)
    for k in range(1, 4):
        torch.testing.assert_close(returned[k], free[k], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# The fast path's prepared products (oneDNN, float32 on a CPU) against float64 products
# ----------------------------------------------------------------------------------------

needs_onednn = pytest.mark.skipif(not cim.onednn_linear_works(),
                                  reason="torch's oneDNN linear ops are missing here")


def float32_and_float64_twins(cfg, seed, device="cpu"):
    """The same network in float32 on `device` and in float64 on the CPU, holding the same
    (float32) values exactly."""
    fast = cim.CorInfoMax(cfg, seed=seed, dtype=torch.float32).to(device)
    plain = cim.CorInfoMax(cfg, seed=seed, dtype=F64)
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def assert_weights_follow(fast, plain):
    """Every buffer of the float32 network equals the float64 one up to float32 rounding."""
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[name].cpu().double(), value, rtol=1e-4,
                                   atol=1e-5)


@needs_onednn
def test_large_float32_matrices_are_packed_for_batches_up_to_the_cap():
    W = torch.zeros(1000, 1000)
    assert cim.Prepared(W, 20).packed is not None
    assert cim.Prepared(W, cim.ONEDNN_MAX_COLUMNS).packed is not None
    assert cim.Prepared(W, cim.ONEDNN_MAX_COLUMNS + 1).packed is None  # the plain product
    assert cim.Prepared(W.double(), 20).packed is None
    assert cim.Prepared(torch.zeros(100, 1000), 20).packed is None  # small W


@needs_onednn
def test_onednn_switch_keeps_plain_products(monkeypatch):
    monkeypatch.setattr(cim, "USE_ONEDNN", False)
    W = torch.zeros(1000, 1000)
    assert not cim.Prepared.pays(W, 20) and cim.Prepared(W, 20).packed is None


@pytest.mark.parametrize("shape, m, width", [((96, 80), 20, 20), ((80, 96), 7, 7),
                                             ((33, 50), 20, 5)])
def test_prepared_product_equals_float64_product(monkeypatch, shape, m, width):
    monkeypatch.setattr(cim, "ONEDNN_MIN_ENTRIES", 0)  # pack even these small matrices
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(*shape, generator=gen)
    r = torch.rand(shape[1], width, generator=gen)
    prepared = cim.Prepared(W, m)
    expected = W.double() @ r.double()
    for layout in (r, cim.by_sample(r)):  # either memory layout of the same values
        got = prepared @ layout
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_by_sample_copies_without_aliasing():
    a = torch.arange(12.0).reshape(3, 4)
    once = cim.by_sample(a)
    twice = cim.by_sample(once)  # already sample after sample: still a new tensor
    assert once.T.is_contiguous() and twice.T.is_contiguous()
    twice.add_(1.0)
    assert torch.equal(once, a) and torch.equal(twice, a + 1.0)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_onednn)],
                         ids=["mm", "onednn"])
def test_float32_fast_step_follows_float64_plain_step(monkeypatch, packed):
    # The fast path in float32 (oneDNN products when packed) against the plain path in
    # float64 from the same state, over two steps: equal up to float32 rounding.
    monkeypatch.setattr(cim, "ONEDNN_MIN_ENTRIES", 0 if packed else 10**12)
    cfg = cim.Config(sizes=[30, 40, 24, 10], layer_types=["sparse", "sparse", "sparse"],
                     lr_ff=[0.3, 0.2, 0.1], lr_fb=[0.07, 0.05], q_lr=[0.01] * 3,
                     random_sign=False, t_free=8, t_nudged=4)
    fast, plain = float32_and_float64_twins(cfg, seed=2)
    gen = torch.Generator().manual_seed(9)
    for _ in range(2):
        x = torch.rand(30, 20, generator=gen)
        labels = torch.randint(10, (20,), generator=gen)
        free32 = fast.train_step(x, labels, fast=True)
        free64 = plain.train_step(x.double(), labels)
        for k in range(1, 4):
            torch.testing.assert_close(free32[k].double(), free64[k], rtol=1e-4, atol=1e-5)
    assert_weights_follow(fast, plain)


@pytest.mark.parametrize("packed", [False, pytest.param(True, marks=needs_onednn)],
                         ids=["mm", "onednn"])
def test_float32_evaluation_batch_follows_float64_plain_free_phase(monkeypatch, packed):
    # Evaluation batches (here 300 columns) through the fast free phase in float32, oneDNN
    # products when packed, against the plain free phase in float64 from the same weights.
    monkeypatch.setattr(cim, "ONEDNN_MIN_ENTRIES", 0 if packed else 10**12)
    cfg = cim.Config(sizes=[30, 40, 24, 10], layer_types=["sparse", "bounded", "sparse"],
                     lr_ff=[0.3, 0.2, 0.1], lr_fb=[0.07, 0.05], q_lr=[0.01] * 3, t_free=12)
    fast, plain = float32_and_float64_twins(cfg, seed=5)
    x = torch.rand(30, 300, generator=torch.Generator().manual_seed(5)) * 4
    assert cim.Prepared.pays(fast.B[1], 300) == packed
    got = fast.free_phase(x, fast=True)
    expected = plain.free_phase(x.double())
    assert all(expected[k].abs().sum() > 0 for k in (1, 2, 3))
    for k in (1, 2, 3):
        torch.testing.assert_close(got[k].double(), expected[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
])
def test_graphed_steps_follow_float64_plain_steps(device):
    # train.py's GraphedStep in float32 (on CUDA: each sign of beta captured once as a CUDA
    # graph, then replayed; on a CPU the same calls without capture) against the plain path
    # in float64 on the CPU from the same state, with the same random signs.
    cfg = cim.Config(sizes=[30, 40, 24, 10], layer_types=["sparse", "bounded", "sparse"],
                     lr_ff=[0.3, 0.2, 0.1], lr_fb=[0.07, 0.05], q_lr=[0.01] * 3,
                     t_free=8, t_nudged=4)
    fast, plain = float32_and_float64_twins(cfg, seed=3, device=device)
    draws = torch.Generator().manual_seed(1)
    signs = [plain.draw_beta(draws) for _ in range(5)]
    assert len(set(signs)) == 2 and len(signs) > 2  # both graphs, and replays of one
    graphed = cim.GraphedStep(fast, 20, capture=device == "cuda")
    gen_fast, gen_plain = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    data = torch.Generator().manual_seed(2)
    for _ in signs:
        x = torch.rand(30, 20, generator=data)
        labels = torch.randint(10, (20,), generator=data)
        free = graphed(x.to(device), labels.to(device), 0.5, gen_fast)
        expected = plain.train_step(x.double(), labels, 0.5, gen_plain)
        for k in range(1, 4):
            torch.testing.assert_close(free[k].cpu().double(), expected[k], rtol=1e-4,
                                       atol=1e-5)
    assert len(graphed.graphs) == (2 if device == "cuda" else 0)
    assert_weights_follow(fast, plain)


def test_random_sign_nudging_uses_both_signs():
    # Eq. 14: each step is the reference step at +beta or at -beta, and both signs occur.
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    labels = torch.tensor([2, 0, 1, 2])
    references = {}
    for beta in (0.5, -0.5):
        references[beta] = reference_train_step(train_step_model(False), x, labels, beta)[1]
    signs = []
    for seed in range(8):
        model = train_step_model(False)
        model.cfg.random_sign = True
        model.train_step(x, labels, generator=torch.Generator().manual_seed(seed))
        matches = [beta for beta, new_ff in references.items()
                   if all(torch.allclose(model.W_ff[k], new_ff[k], rtol=1e-12, atol=1e-12)
                          for k in range(3))]
        assert len(matches) == 1
        signs.append(matches[0])
    assert set(signs) == {0.5, -0.5}


def test_learning_rate_schedule():
    # mu(e) = mu_0 d^e for e < E1, else mu_0 0.9^e (a jump at E1)
    got = [cim.lr_scale(e, 0.95, 15) for e in (0, 1, 14, 15, 20)]
    assert got == pytest.approx([1.0, 0.95, 0.95**14, 0.9**15, 0.9**20], rel=1e-12)


# ----------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_type", ["sparse", "bounded"])
def test_evaluation_does_not_depend_on_batch_size(layer_type):
    model = make_model([12, 9, 6], [layer_type] * 2, seed=3, t_free=15)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 12, generator=gen, dtype=F64)
    labels = torch.randint(6, (30,), generator=gen)
    # Oracle: each sample alone through the plain relaxation (checked by hand above).
    alone = [model.free_phase(X[i:i + 1].T, fast=False) for i in range(30)]
    expected = torch.stack([r[2][:, 0].argmax() for r in alone])
    silent = [sum((r[k] < 0.01).double().mean().item() for r in alone) / 30 for k in (1, 2)]
    assert len(set(expected.tolist())) > 1 and 0 < silent[0] < 1  # a non-trivial case
    for bs in (1, 7, 30):
        chunks = [model.predict(X[s:s + bs].T) for s in range(0, 30, bs)]
        assert torch.equal(torch.cat(chunks), expected)
    accuracy = (expected == labels).double().mean().item()
    results = [cim.evaluate(model, X, labels, batch_size=bs) for bs in (1, 7, 30)]
    for res in results:
        assert res["n"] == 30
        assert res["top1"] == accuracy
        assert res["top5"] == results[0]["top5"]
        assert res["sparsity"] == pytest.approx(silent, abs=1e-12)


def test_evaluate_top1_uses_the_argmax_prediction_when_the_output_is_silent():
    # A silent output layer (all r_P = 0) is common with relu outputs; the prediction is
    # then argmax = the first class, and evaluate's top-1 must score that same prediction.
    model = make_model([12, 9, 6], ["sparse"] * 2, seed=3, t_free=15)
    model.W_ff_1.copy_(-model.W_ff_1.abs())  # every output neuron is inhibited
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(30, 12, generator=gen, dtype=F64)
    labels = torch.randint(6, (30,), generator=gen)
    assert not model.free_phase(X.T)[2].any()  # the output layer is silent
    assert torch.equal(model.predict(X.T), torch.zeros(30, dtype=torch.long))
    expected = (labels == 0).double().mean().item()
    assert cim.evaluate(model, X, labels)["top1"] == expected


# ----------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("W_fb, degrees", [
    ([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], 0.0),  # W_fb^T equals W_ff
    ([[-2.0, -4.0, 0.0], [0.0, 0.0, -6.0]], 180.0),  # opposite direction
    ([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]], 90.0),  # no overlap: orthogonal
    ([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 74.498640433063),  # cos = 1 / sqrt(14)
])
def test_angle_between_forward_and_backward_predictors(W_fb, degrees):
    model = make_model([2, 2, 3], ["sparse", "sparse"])
    model.W_ff_1.copy_(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]], dtype=F64))
    model.W_fb_1.copy_(torch.tensor(W_fb, dtype=F64))
    x = torch.rand(2, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert model.diagnostics(x)["angle"] == [pytest.approx(degrees, abs=1e-6)]


def test_correlative_information_of_one_neuron_by_hand():
    # One input and one output neuron, two samples: R_out = (0.5^2 + 1^2) / 2 = 0.625; with
    # W = 2 the errors are 0.5 - 0.4 = 0.1 and 1 - 0.6 = 0.4, R_e = (0.01 + 0.16) / 2 = 0.085.
    r_in = torch.tensor([[0.2, 0.3]], dtype=F64)
    r_out = torch.tensor([[0.5, 1.0]], dtype=F64)
    W = torch.tensor([[2.0]], dtype=F64)
    expected = 0.5 * np.log((0.625 + 0.15) / (0.085 + 0.15))
    assert cim.correlative_information(r_in, r_out, W, 0.15) == pytest.approx(expected)


# ----------------------------------------------------------------------------------------
# Learning
# ----------------------------------------------------------------------------------------

def clusters(n_per_class, seed, n_classes=3, dim=20, noise=0.2):
    """Gaussian clusters around disjoint blocks of ones: class k lights up inputs
    6k..6k+5 (the last two inputs carry noise only)."""
    gen = torch.Generator().manual_seed(seed)
    block = dim // n_classes
    X = torch.cat([
        torch.zeros(n_per_class, dim, dtype=F64).index_fill_(
            1, torch.arange(k * block, (k + 1) * block), 1.0)
        + noise * torch.randn(n_per_class, dim, generator=gen, dtype=F64)
        for k in range(n_classes)])
    return X, torch.arange(n_classes).repeat_interleave(n_per_class)


def test_training_learns_separated_clusters():
    Xtr, ytr = clusters(40, seed=1)
    Xte, yte = clusters(25, seed=2)
    model = make_model([20, 32, 3], ["sparse", "sparse"], lr_ff=[1.0, 0.7], lr_fb=[0.12],
                       q_lr=[0.0, 0.01], neural_lr=0.05, t_free=20, t_nudged=5, g=0.5,
                       beta=3.0)
    before = cim.evaluate(model, Xte, yte)["top1"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        order = torch.randperm(len(ytr), generator=gen)
        for start in range(0, len(ytr), 10):
            idx = order[start:start + 10]
            model.train_step(Xtr[idx].T, ytr[idx], generator=gen)
    after = cim.evaluate(model, Xte, yte)["top1"]
    assert before < 0.5  # the untrained network is near chance (1/3)
    assert after >= 0.9


# ----------------------------------------------------------------------------------------
# Command-line programs on tiny data sets
# ----------------------------------------------------------------------------------------

def write_imagefolder(root, n_per_class=12, n_classes=3, mode="RGB"):
    """8x8 PNGs in root/train and root/test, one folder per class, in colour mode `mode`."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(n_classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 4  # a faint class signal in one channel
                Image.fromarray(pixels, "RGB").convert(mode).save(folder / f"{i}.png")


def test_train_and_evaluate_end_to_end_on_imagefolder(tmp_path, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    write_imagefolder(data)
    rc = train.main(["--dataset", "imagefolder", "--data-dir", str(data), "--hidden", "8",
                     "--t-free", "5", "--t-nudged", "2", "--batch-size", "4", "--device",
                     "cpu", "--epochs", "2", "--out", str(run)])
    assert rc == 0
    for name in ("last.pt", "metrics.json", "config.json", "curves.png"):
        assert (run / name).is_file(), name
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "train_top1", "train_top5", "test_top1", "test_top5", "sparsity",
                "seconds"} <= set(m)
        for key in ("train_top1", "train_top5", "test_top1", "test_top5"):
            assert 0.0 <= m[key] <= 1.0
        assert m["train_top1"] <= m["train_top5"] and m["test_top1"] <= m["test_top5"]
        assert len(m["sparsity"]) == 2 and all(0.0 <= s <= 1.0 for s in m["sparsity"])
        assert m["seconds"] >= 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["sizes"] == [8 * 8 * 3, 8, 3]

    capsys.readouterr()
    assert evaluate_cli.main([str(run), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 3 * 12
    assert result["top1"] == metrics[-1]["test_top1"]
    assert result["top5"] == metrics[-1]["test_top5"]


def write_cifar100(root, n_train=30, n_test=10):
    """The three pickles of torchvision's cifar-100-python/ folder (string keys, as the
    original Python 2 pickles read with encoding="latin1")."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, 100, n)]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"class{i}" for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def offline(*args, **kwargs):
    raise urllib.error.URLError("offline")


def test_default_cifar100_path_runs_on_tiny_data(tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    # Fake files cannot match torchvision's md5 sums. CIFAR100._check_integrity covers the
    # data files; the meta file is checked separately through cifar.check_integrity.
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    run = tmp_path / "run"
    rc = train.main(["--data-dir", str(tmp_path), "--epochs", "1", "--hidden", "8,6",
                     "--t-free", "3", "--t-nudged", "2", "--device", "cpu", "--out", str(run)])
    assert rc == 0
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"] == "cifar100" and config["preset"] == "cifar100"
    assert config["model"]["sizes"] == [3072, 8, 6, 100]
    assert config["model"]["layer_types"] == ["sparse"] * 3
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model"]["W_ff_2"].shape == (100, 6)
    assert len(json.loads((run / "metrics.json").read_text())) == 1


def test_missing_cifar100_without_network_fails_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "download", offline)
    data = tmp_path / "empty"
    data.mkdir()
    start = time.time()
    rc = train.main(["--data-dir", str(data), "--epochs", "1", "--device", "cpu", "--out",
                     str(tmp_path / "run")])
    assert time.time() - start < 20
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "cifar-100-python.tar.gz" in err and "cifar-100-python/" in err
    assert str(data) in err


# ----------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device")),
])
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("bad", [[0, 3], [-1, 1]], ids=["too-large", "negative"])
def test_label_outside_class_range_is_a_clear_error(device, bad, fast):
    model = make_model([4, 3, 3], ["sparse", "sparse"]).to(device)
    before = {name: b.clone() for name, b in model.named_buffers()}
    x = torch.rand(4, 2, dtype=F64, device=device)
    with pytest.raises(ValueError, match=r"0\.\.2"):
        model.train_step(x, torch.tensor(bad, device=device), fast=fast)
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


def config_kwargs(**changes):
    kw = dict(sizes=[4, 3, 2], layer_types=["sparse", "sparse"], lr_ff=[0.1, 0.1],
              lr_fb=[0.1], q_lr=[0.01, 0.01])
    kw.update(changes)
    return kw


def test_config_accepts_valid_values():
    cim.Config(**config_kwargs())


@pytest.mark.parametrize("changes, named", [
    (dict(lam=0.0), "lam"), (dict(lam=1.0), "lam"), (dict(lam=1.5), "lam"),
    (dict(lam=-0.1), "lam"), (dict(lr_ff=[0.1]), "lr_ff"), (dict(lr_ff=[0.1] * 3), "lr_ff"),
    (dict(lr_fb=[]), "lr_fb"), (dict(lr_fb=[0.1, 0.1]), "lr_fb"), (dict(q_lr=[0.01]), "q_lr"),
    (dict(layer_types=["sparse"]), "layer_types"),
    (dict(layer_types=["sparse", "dense"]), "layer types"),
    (dict(sizes=[4, 0, 2]), "sizes"), (dict(beta=0.0), "beta"), (dict(eps=0.0), "eps"),
    (dict(t_free=0), "t_free"), (dict(neural_lr_rule="linear"), "neural_lr_rule"),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) if isinstance(c, dict) else c)
def test_config_rejects_bad_values(changes, named):
    with pytest.raises(ValueError, match=named):
        cim.Config(**config_kwargs(**changes))


# ----------------------------------------------------------------------------------------
# Run guarantees of train.py and evaluate.py: reproducible, exactly resumable, safe
# checkpoints, caught divergence, one-line errors, evaluation independent of batch size
# ----------------------------------------------------------------------------------------

N_PER_CLASS, N_CLASSES, BATCH = 12, 3, 4
STEPS_PER_EPOCH = math.ceil(N_PER_CLASS * N_CLASSES / BATCH)
TINY = ["--dataset", "imagefolder", "--hidden", "6", "--t-free", "4", "--t-nudged", "2",
        "--batch-size", str(BATCH), "--device", "cpu", "--seed", "5"]


def tiny_args(data, out, *extra):
    """train.py's argv for the tiny recipe on `data`, writing to `out`."""
    return TINY + ["--data-dir", str(data), "--out", str(out)] + [str(a) for a in extra]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-data")
    write_imagefolder(root, N_PER_CLASS, N_CLASSES)
    return root


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, tmp_path_factory):
    """A finished 2-epoch run; tests that may write to a run use copy_run first."""
    out = tmp_path_factory.mktemp("runs") / "two-epochs"
    assert train.main(tiny_args(tiny_data, out, "--epochs", 2)) == 0
    return out


def copy_run(run, tmp_path):
    return Path(shutil.copytree(run, tmp_path / run.name))


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def checkpoint(run):
    return torch.load(run / "last.pt", map_location="cpu", weights_only=True)


def without_seconds(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def shown_lines(text):
    """The non-empty lines a terminal shows: a progress bar redraws its line after '\\r'."""
    return [s for line in text.split("\n") if (s := line.split("\r")[-1].strip())]


def cli_error(capsys, main, argv):
    """Run main(argv) (argparse exits too) and check it failed with one clear line of
    stderr and no traceback; returns that line."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc not in (0, None)
    assert "Traceback" not in out + err
    lines = shown_lines(err)
    assert len(lines) == 1, err
    return lines[0]


def test_same_seed_gives_identical_runs(tiny_data, two_epoch_run, tmp_path):
    other = tmp_path / "other"
    assert train.main(tiny_args(tiny_data, other, "--epochs", 2)) == 0
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (two_epoch_run, other)]
    assert len(metrics[0]) == 2 and without_seconds(metrics[0]) == without_seconds(metrics[1])
    first, second = checkpoint(two_epoch_run)["model"], checkpoint(other)["model"]
    assert_same_weights(first, second)
    # Not vacuous: training moved the weights away from their seeded start.
    config = json.loads((other / "config.json").read_text())
    start = cim.CorInfoMax(cim.Config(**config["model"]), seed=5).state_dict()
    assert not all(torch.equal(first[name], start[name]) for name in start)


@pytest.mark.parametrize("target", ["", "last.pt"], ids=["run-folder", "its-last.pt"])
def test_resume_continues_bit_for_bit(tiny_data, two_epoch_run, tmp_path, target):
    straight = tmp_path / "straight"
    assert train.main(tiny_args(tiny_data, straight, "--epochs", 3)) == 0
    resumed = copy_run(two_epoch_run, tmp_path)
    argv = ["--resume", str(resumed / target), "--epochs", "3", "--device", "cpu"]
    assert train.main(argv) == 0
    a, b = checkpoint(straight), checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 3
    assert set(a["model"]) == {"W_ff_0", "W_ff_1", "W_fb_1", "B_1", "B_2"}
    assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])
    assert len(a["metrics"]) == 3
    assert without_seconds(a["metrics"]) == without_seconds(b["metrics"])
    on_disk = [json.loads((r / "metrics.json").read_text()) for r in (straight, resumed)]
    assert without_seconds(on_disk[0]) == without_seconds(on_disk[1])


def test_interrupted_run_resumes_to_its_own_epoch_count(tiny_data, tmp_path, monkeypatch,
                                                        capsys):
    """Ctrl-C in epoch 2 of 3 keeps epoch 1's checkpoint; --resume without --epochs then
    trains to the run's own 3 epochs, no more."""
    out = tmp_path / "run"
    real_epoch = train.train_epoch
    calls = []

    def interrupted_in_second_epoch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_epoch(*args)

    monkeypatch.setattr(train, "train_epoch", interrupted_in_second_epoch)
    assert train.main(tiny_args(tiny_data, out, "--epochs", 3)) == 130
    assert "--resume" in capsys.readouterr().err
    assert checkpoint(out)["epoch"] == 1
    monkeypatch.setattr(train, "train_epoch", real_epoch)
    assert train.main(["--resume", str(out), "--device", "cpu"]) == 0
    assert checkpoint(out)["epoch"] == 3
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2, 3]


def assert_plain(obj, where="checkpoint"):
    """Only tensors and plain Python values, inside dicts, lists and tuples."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert isinstance(key, str | int), where
            assert_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            assert_plain(value, f"{where}[{i}]")
    else:
        assert obj is None or isinstance(obj, torch.Tensor | bool | int | float | str), where


def test_checkpoint_holds_plain_values_epoch_counter_and_rng_states(two_epoch_run):
    ckpt = checkpoint(two_epoch_run)  # weights_only=True: no pickled objects
    assert_plain(ckpt)
    assert isinstance(ckpt["format_version"], int)
    assert ckpt["epoch"] == 2 and len(ckpt["metrics"]) == 2
    assert {"torch", "generator", "python", "numpy"} <= set(ckpt["rng"])


@pytest.mark.parametrize("epochs", [1, 2])
def test_resume_of_a_run_that_has_its_epochs_changes_nothing(two_epoch_run, tmp_path, epochs):
    run = copy_run(two_epoch_run, tmp_path)
    before = files(run)
    train.main(["--resume", str(run), "--epochs", str(epochs), "--device", "cpu"])
    assert files(run) == before


def test_interrupted_save_keeps_the_previous_checkpoint(tiny_data, tmp_path, monkeypatch):
    real_save, targets = torch.save, []

    def save_that_dies_the_second_time(obj, f, *args, **kwargs):
        targets.append(f)
        if len(targets) == 1:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"\x80\x02garbage, cut short")
        raise OSError("no space left on device")

    monkeypatch.setattr(torch, "save", save_that_dies_the_second_time)
    run = tmp_path / "run"
    try:
        rc = train.main(tiny_args(tiny_data, run, "--epochs", 2))
    except OSError:
        rc = None
    assert rc != 0 and len(targets) == 2
    assert checkpoint(run)["epoch"] == 1
    monkeypatch.undo()  # and the surviving checkpoint continues the run
    assert train.main(["--resume", str(run), "--epochs", "2", "--device", "cpu"]) == 0
    assert checkpoint(run)["epoch"] == 2


@pytest.mark.parametrize("flags", [["--neural-lr", "1e6"], ["--lr-ff", "1e12,1e12"]],
                         ids=" ".join)
def test_divergence_fails_with_one_line_naming_the_rates(tiny_data, tmp_path, capsys, flags):
    run = tmp_path / "run"
    line = cli_error(capsys, train.main, tiny_args(tiny_data, run, "--epochs", 2, *flags))
    assert "--neural-lr" in line and "--lr-ff" in line
    assert not (run / "last.pt").exists()


@pytest.mark.parametrize("step", [1, 2])
def test_divergence_in_second_epoch_keeps_the_last_good_checkpoint(
        tiny_data, tmp_path, capsys, monkeypatch, step):
    run, real_step, calls, saved = tmp_path / "run", cim.CorInfoMax.fast_step, [], {}

    def poisoned_step(self, *args):
        calls.append(len(calls) + 1)
        if calls[-1] == STEPS_PER_EPOCH + 1:  # epoch 2 starts: its checkpoint is epoch 1's
            saved.update(files(run))
        free = real_step(self, *args)
        if calls[-1] == STEPS_PER_EPOCH + step:
            self.B_1[0, 0] = float("nan")
        return free

    monkeypatch.setattr(cim.CorInfoMax, "fast_step", poisoned_step)
    line = cli_error(capsys, train.main, tiny_args(tiny_data, run, "--epochs", 3))
    assert "--neural-lr" in line and "--lr-ff" in line
    assert len(calls) >= STEPS_PER_EPOCH + step
    assert checkpoint(run)["epoch"] == 1
    assert (run / "last.pt").read_bytes() == saved["last.pt"]
    assert (run / "metrics.json").read_bytes() == saved["metrics.json"]


@pytest.mark.parametrize("flags", [
    ["--dataset", "svhn"], ["--preset", "cifar7"], ["--lr-ff", "0.1"],
    ["--lr-ff", "0.1,0.1,0.1"], ["--lr-fb", "0.1,0.1"], ["--q-lr", "0.01"], ["--hidden", "0"],
    ["--hidden", "-3"], ["--lr-ff", "abc,1"], ["--epochs", "0"], ["--batch-size", "-1"],
    ["--neural-lr", "nan"], ["--lam", "1.5"], ["--lam", "1"],
    ["--batch-size", "100"],  # more than the 36 training images
    ["--neural-lr-stop", "0.5"],  # above the recipe's --neural-lr
    ["--seed", str(2**64)], ["--device", "mps"], ["--device", "meta"], ["--epochs", "1e3"],
    pytest.param(["--device", "cuda"], marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="CUDA is present")),
], ids=" ".join)
def test_bad_flag_fails_with_one_line_naming_it(tiny_data, tmp_path, capsys, flags):
    line = cli_error(capsys, train.main, tiny_args(tiny_data, tmp_path / "run", *flags))
    assert flags[0] in line


@pytest.mark.parametrize("n_classes, empty_class, odd_image, named", [
    (1, None, None, "train"),
    (3, "class3", None, "train/class3"),
    (3, None, ("RGB", (9, 8)), "train/class1/2.png"),
    (3, None, ("L", (8, 8)), "train/class1/2.png"),
], ids=["one-class", "empty-class", "other-size", "other-colour-mode"])
def test_bad_imagefolder_fails_with_one_line(tmp_path, capsys, n_classes, empty_class,
                                             odd_image, named):
    data = tmp_path / "data"
    write_imagefolder(data, 4, n_classes)
    if empty_class:
        (data / "train" / empty_class).mkdir()
    if odd_image:
        Image.new(*odd_image).save(data / named)
    line = cli_error(capsys, train.main, tiny_args(data, tmp_path / "run"))
    assert str(data / named) in line


@pytest.mark.parametrize("content", [b"", b"not an image", "truncated"])
def test_unreadable_image_fails_with_one_line_naming_it(tmp_path, capsys, content):
    data = tmp_path / "data"
    write_imagefolder(data, 4)
    bad = data / "test" / "class2" / "1.png"
    if content == "truncated":
        content = bad.read_bytes()[:40]
    bad.write_bytes(content)
    line = cli_error(capsys, train.main, tiny_args(data, tmp_path / "run"))
    assert str(bad) in line


def test_constant_colour_channel_fails_with_one_line(tmp_path, capsys):
    """An opaque alpha channel has zero spread: normalising by it would make NaN inputs."""
    data = tmp_path / "data"
    write_imagefolder(data, 4, mode="RGBA")
    line = cli_error(capsys, train.main, tiny_args(data, tmp_path / "run"))
    assert "channel 3" in line and "RGB" in line


@pytest.mark.parametrize("tool", ["train", "evaluate"])
def test_test_classes_are_matched_by_name(two_epoch_run, tiny_data, tmp_path, capsys, tool):
    """Same number of classes, one renamed: labels would shift silently if matched by count."""
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    (data / "test" / "class0").rename(data / "test" / "zeppelin")
    if tool == "train":
        line = cli_error(capsys, train.main, tiny_args(data, tmp_path / "run"))
    else:
        argv = [two_epoch_run, "--data-dir", data, "--device", "cpu"]
        line = cli_error(capsys, evaluate_cli.main, argv)
    assert "zeppelin" in line and "class0" in line


def test_out_that_is_a_file_fails_before_any_work(tiny_data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    for out in (afile, afile / "sub"):
        line = cli_error(capsys, train.main, tiny_args(tiny_data, out))
        assert "--out" in line
    assert afile.read_text() == "keep me"


def test_divergence_in_the_first_epoch_says_no_checkpoint_exists(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    line = cli_error(capsys, train.main, tiny_args(tiny_data, run, "--neural-lr", "1e6"))
    assert "no checkpoint" in line and not (run / "last.pt").exists()


def test_evaluate_refuses_a_checkpoint_with_non_finite_weights(two_epoch_run, tmp_path, capsys):
    run = copy_run(two_epoch_run, tmp_path)
    ckpt = checkpoint(run)
    ckpt["model"]["W_ff_0"][0, 0] = float("nan")
    torch.save(ckpt, run / "last.pt")
    line = cli_error(capsys, evaluate_cli.main, [run, "--device", "cpu"])
    assert "non-finite" in line


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--batch-size", "0"],
                                   ["--eval-samples", "-5"], ["--device", "tpu"],
                                   ["--preset", "nope"],
                                   ["--batch-size", "99999999999"],  # 313 TB of inputs
                                   ["--steps", "1" + "0" * 20]],  # above any int64
                         ids=" ".join)
def test_benchmark_bad_flag_fails_with_one_line(capsys, flags):
    line = cli_error(capsys, benchmark.main, ["--preset", "mnist", "--device", "cpu", *flags])
    assert flags[0] in line or flags[1] in line


def test_benchmark_reports_the_evaluation_batch_it_ran(capsys):
    argv = ["--preset", "mnist", "--device", "cpu", "--steps", "1", "--eval-samples", "3",
            "--json"]
    benchmark.main(argv)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_batch_size"] == 3 and result["layers"] == [784, 500, 10]


def test_missing_cifar10_without_network_fails_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    argv = tiny_args(tmp_path, tmp_path / "run", "--dataset", "cifar10")
    assert "cifar-10-python.tar.gz" in cli_error(capsys, train.main, argv)


@pytest.mark.parametrize("flags, other_data, named", [
    (["--hidden", "9"], None, ["--hidden"]),
    (["--dataset", "cifar10"], None, ["--dataset"]),
    ([], dict(n_classes=4), ["--data-dir"]),
    ([], dict(mode="L"), []),  # 3 classes of 8x8 images, but one channel, not three
], ids=["hidden", "dataset", "data-with-4-classes", "grayscale-data"])
def test_resume_that_would_change_the_run_fails_with_one_line(
        two_epoch_run, tmp_path, capsys, flags, other_data, named):
    run = copy_run(two_epoch_run, tmp_path)
    before = files(run)
    argv = ["--resume", run, "--epochs", 3, "--device", "cpu", *flags]
    if other_data is not None:
        write_imagefolder(tmp_path / "other", 4, **other_data)
        argv += ["--data-dir", tmp_path / "other"]
    line = cli_error(capsys, train.main, argv)
    assert all(word in line for word in named), line
    assert files(run) == before


def test_resume_without_checkpoint_fails_with_one_line(tmp_path, capsys):
    argv = ["--resume", tmp_path, "--epochs", 2, "--device", "cpu"]
    assert "last.pt" in cli_error(capsys, train.main, argv)


@pytest.mark.parametrize("key", ["resume", "out", "data-dir"])
def test_empty_folder_flag_fails_with_one_line(tiny_data, tmp_path, capsys, key):
    """An unset shell variable (--resume $RUN) must not start a fresh run instead."""
    argv = tiny_args(tiny_data, tmp_path / "run") + [f"--{key}", ""]
    assert f"--{key}" in cli_error(capsys, train.main, argv)
    assert not (tmp_path / "run").exists()


def test_checkpoint_lacking_entries_fails_with_one_line(two_epoch_run, tmp_path, capsys):
    run = copy_run(two_epoch_run, tmp_path)
    ckpt = checkpoint(run)
    del ckpt["config"]
    torch.save(ckpt, run / "last.pt")
    before = files(run)
    argv = ["--resume", run, "--epochs", 3, "--device", "cpu"]
    assert "config" in cli_error(capsys, train.main, argv)
    assert "config" in cli_error(capsys, evaluate_cli.main, [run, "--device", "cpu"])
    assert files(run) == before


def test_resume_refuses_a_checkpoint_with_non_finite_weights(two_epoch_run, tmp_path, capsys):
    run = copy_run(two_epoch_run, tmp_path)
    ckpt = checkpoint(run)
    ckpt["model"]["B_1"][1, 1] = float("inf")
    torch.save(ckpt, run / "last.pt")
    before = files(run)
    argv = ["--resume", run, "--epochs", 3, "--device", "cpu"]
    assert "non-finite" in cli_error(capsys, train.main, argv)
    assert files(run) == before


def test_out_folder_holding_a_run_fails_with_one_line(tiny_data, two_epoch_run, tmp_path,
                                                      capsys):
    run = copy_run(two_epoch_run, tmp_path)
    before = files(run)
    line = cli_error(capsys, train.main, tiny_args(tiny_data, run, "--epochs", 3))
    assert "--resume" in line
    assert files(run) == before


@pytest.mark.parametrize("args, named", [
    ([], "last.pt"), (["--split", "validation"], "--split"),
    (["--batch-size", "0"], "--batch-size"),
], ids=["no-checkpoint", "unknown-split", "zero-batch"])
def test_evaluate_bad_input_fails_with_one_line(tmp_path, capsys, args, named):
    argv = [tmp_path, "--device", "cpu", *args]
    assert named in cli_error(capsys, evaluate_cli.main, argv)


def test_evaluate_counts_every_sample_once_whatever_the_batch_size():
    model = make_model([12, 9, 7], ["sparse", "sparse"], seed=3, t_free=15)
    X = torch.randn(13, 12, generator=torch.Generator().manual_seed(1), dtype=F64)
    # Oracle: each sample relaxed alone; silent rates counted as integers.
    rates = [model.free_phase(X[i:i + 1].T, fast=True) for i in range(13)]
    alone = torch.cat([model.predict(X[i:i + 1].T) for i in range(13)])
    silent = [sum(int((r[k] < 0.01).sum()) for r in rates) / (13 * n)
              for k, n in ((1, 9), (2, 7))]
    assert len(set(alone.tolist())) > 1 and 0 < silent[0] < 1
    # Right on samples at both ends of the batches of 4 and of 5, wrong on all others.
    right = torch.zeros(13, dtype=torch.bool)
    right[[0, 3, 4, 9, 12]] = True
    labels = torch.where(right, alone, (alone + 1) % 7)
    results = [cim.evaluate(model, X, labels, batch_size=bs) for bs in (1, 4, 5, 1000)]
    for res in results:
        assert res["n"] == 13
        assert res["top1"] == 5 / 13
        assert res["top5"] == results[0]["top5"]
        assert res["sparsity"] == pytest.approx(silent, rel=1e-12)
        assert res["sparsity"] == results[0]["sparsity"]  # identical, as top-1 and top-5


def test_evaluate_cli_does_not_depend_on_batch_size(two_epoch_run, capsys):
    results = []
    for bs in (1, 5, 1000):
        capsys.readouterr()
        argv = [str(two_epoch_run), "--json", "--device", "cpu", "--batch-size", str(bs)]
        assert evaluate_cli.main(argv) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["n"] == N_PER_CLASS * N_CLASSES
    assert results[1] == results[0] and results[2] == results[0]
