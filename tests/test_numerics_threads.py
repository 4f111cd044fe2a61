"""The suite's numerics do not depend on the thread count.

Numerics-sensitive cases of the suite, at sizes where BLAS, LAPACK and reductions split their work across
threads, run in two subprocesses with ``OMP_NUM_THREADS=1`` and ``=2``. Each run must meet the tolerance the
suite uses for that case, and the two runs must agree with each other within it. They need not agree bitwise:
a float32 sum split over two threads is rounded in another order, which is why no test of the suite may compare
results of different code paths exactly or with a bound at the last bits.

* full-rank SI of a linear layer vs the dense layer: relative 1e-4 (as ``test_core_layers``; float32 SVD);
* FD penalty and gradients, autograd through the Gram route and the closed form used by decoupled FD, vs the
  dense product in float64: relative 1e-5 (``RTOL`` of ``test_core_frobenius``);
* per-head SI: the error of each head's rank-r form equals the tail of the dense form's singular values
  (Eckart-Young, float64 reference): relative 1e-4 (as the Eckart-Young checks of ``test_fairseq_model`` and
  ``test_hf_patch``). The error, not the rank-r product itself: where two singular values are close the
  truncated product is ill-conditioned, its error is not.

Measured with 1 and with 2 threads: SI 1.1e-6, FD 2.1e-7, per-head SI 5e-10; the SI outputs of the two runs
differ (by 1.6e-6), the FD results here are bitwise equal.
"""

import os
import subprocess
import sys

import torch

TOL = {
    "si_linear": 1e-4,
    "fd_penalty": 1e-5,
    "fd_grad_U": 1e-5,
    "fd_grad_V": 1e-5,
    "fd_closed_U": 1e-5,
    "fd_closed_V": 1e-5,
    "head_si": 1e-4,
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def _cases() -> dict:
    """{case: (result, reference)}; computed in the subprocess."""
    import fnl_transformers as fnl
    from fnl_transformers.core.spectral import head_spectral_init

    g = torch.Generator().manual_seed(0)
    out = {}
    lin = torch.nn.Linear(512, 384)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(384, 512, generator=g) / 512**0.5)
        lin.bias.copy_(torch.randn(384, generator=g))
    x = torch.randn(256, 512, generator=g)
    with torch.no_grad():
        out["si_linear"] = (fnl.FactorizedLinear.from_linear(lin, rank_scale=1.0)(x), lin(x))

    layer = fnl.FactorizedLinear(768, 512, rank=64)
    with torch.no_grad():
        layer.U.copy_(torch.randn(512, 64, generator=g))
        layer.V.copy_(torch.randn(768, 64, generator=g))
    pen = fnl.frobenius_penalty(layer, linear=0.3)
    pen.backward()
    U, V = layer.U.detach().double().requires_grad_(), layer.V.detach().double().requires_grad_()
    dense = 0.3 / 2 * (U @ V.T).pow(2).sum()
    dense.backward()
    out["fd_penalty"] = (pen, dense)
    out["fd_grad_U"], out["fd_grad_V"] = (layer.U.grad, U.grad), (layer.V.grad, V.grad)
    closed = fnl.fd_grads(layer, linear=0.3)
    out["fd_closed_U"], out["fd_closed_V"] = (closed["U"], U.grad), (closed["V"], V.grad)

    H, d, k, r = 12, 256, 32, 16
    A, B = torch.randn(H, d, k, generator=g), torch.randn(H, d + 1, k, generator=g)
    A2, B2 = head_spectral_init(A, B, r)
    P = A.double() @ B.double().transpose(1, 2)
    err = (P - (A2 @ B2.transpose(1, 2)).double()).norm(dim=(1, 2))  # per head
    out["head_si"] = (err, torch.linalg.svdvals(P)[:, r:].pow(2).sum(-1).sqrt())
    return out


def test_numerics_agree_across_thread_counts(tmp_path):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"threads{n}.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        res = subprocess.run(
            [sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = torch.load(out, weights_only=True)
    assert (runs[1]["threads"], runs[2]["threads"]) == (1, 2)  # the variable took effect
    assert set(runs[1]["results"]) == set(runs[2]["results"]) == set(TOL)
    for case, tol in TOL.items():
        for n, run in runs.items():
            got, ref = run["results"][case]
            assert _rel(got, ref) <= tol, (case, n, _rel(got, ref))
        # the same computation with 1 and with 2 threads: within the same tolerance of each other
        a, b = runs[1]["results"][case][0], runs[2]["results"][case][0]
        assert _rel(a, b) <= tol, (case, "1 vs 2 threads", _rel(a, b))


if __name__ == "__main__":  # the subprocess: compute every case and save results with the thread count
    torch.save(
        {
            "threads": torch.get_num_threads(),
            "results": {c: (a.detach(), b.detach()) for c, (a, b) in _cases().items()},
        },
        sys.argv[1],
    )
