"""BatchTopK selection for training: the batch-level top ``n * k`` and the sparse training pass.

Only training (and :meth:`BatchTopKSAE.encode` / ``forward`` without the threshold, which evaluate what training
optimises) selects latents over a batch; encoding a case uses the SAE's own inference rule
(:meth:`BatchTopKSAE.encode`, :meth:`BatchTopKSAE.latent_codes`), which never imports this module.

- :func:`batch_topk`: the ``n * k`` largest positive pre-activations of a batch, differentiable through the
  selected entries only.
- :func:`train_forward`: the training pass with the codes held as a CSR matrix, forward and backward
  (``benchmarks/sae_train.py`` measures it against a dense step).

Shapes: ``x`` ``(n, d_in)``; selections as ``(rows, latents, values)`` of equal length ``<= n * k``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .model import BatchTopKSAE


class _SparseEncode(torch.autograd.Function):
    """ReLU pre-activations gathered at given (row, latent) pairs, with a backward that only touches them.

    Forward: ``values[i] = relu(x[rows[i]] . W_enc[:, latents[i]] + b_enc[latents[i]])`` (already computed by the
    caller; passed in to avoid recomputation). Backward: the gradients of ``x``, ``W_enc`` and ``b_enc`` through
    the selected entries only -- ``n*k*d`` work instead of two dense ``n*d_sae*d`` products.
    """

    @staticmethod
    def forward(ctx, values, x, w_enc, b_enc, rows, latents):
        ctx.save_for_backward(x, w_enc, rows, latents, values)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        x, w_enc, rows, latents, values = ctx.saved_tensors
        grad = grad_values * (values > 0)  # ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_x = torch.zeros_like(x).index_add_(0, rows, grad[:, None] * w_enc.t().index_select(0, latents))
        if ctx.needs_input_grad[2]:
            grad_w_t = torch.zeros(w_enc.shape[1], w_enc.shape[0], dtype=x.dtype, device=x.device)
            grad_w = grad_w_t.index_add_(0, latents, grad[:, None] * x.index_select(0, rows)).t()
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(w_enc.shape[1], dtype=x.dtype, device=x.device).index_add_(0, latents, grad)
        return None, grad_x, grad_w, grad_b, None, None


def batch_topk_flat_indices(pre_flat: torch.Tensor, m: int, oversample: float = 1.5) -> torch.Tensor:
    """Positions of the ``m`` largest entries of ``pre_flat``, in ascending position order (exact).

    A full ``topk`` over ``n * d_sae`` entries dominates a training step. A random 1/16 sample gives a value that
    about ``oversample * m`` entries exceed; ``topk`` then runs on those candidates only. When the candidates are
    too few the full ``topk`` runs, so the result is always the exact top ``m``.
    """
    numel = pre_flat.numel()
    m = min(m, numel)
    if numel >= 1 << 16 and m < numel // 4:
        sample = pre_flat[torch.randint(numel, (numel // 16,), device=pre_flat.device)]
        want = min(sample.numel(), max(1, int(m / 16 * oversample)))
        cut = torch.topk(sample, want, sorted=False).values.min()
        candidates = torch.nonzero(pre_flat >= cut).squeeze(1)
        if candidates.numel() >= m:
            top = torch.topk(pre_flat[candidates], m, sorted=False).indices
            return torch.sort(candidates[top]).values
    return torch.sort(torch.topk(pre_flat, m, sorted=False).indices).values


def _csr(crow: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # PyTorch flags CSR support as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _BatchTopKAutoencode(torch.autograd.Function):
    """``x -> x^`` of a BatchTopK SAE with the codes held as a CSR matrix, forward and backward.

    Every product that involves the codes is sparse-dense (``n*k*d`` work): the decode ``Z W_dec``, the decoder
    gradient ``Z^T g``, the code gradient sampled at the active entries (SDDMM), and the encoder gradients
    ``G^T x`` and ``G W_enc^T``. Only the encoder's forward ``x W_enc`` stays dense. Returns ``(x^, latents)``;
    ``latents`` (active latent ids, one per kept activation) is not differentiable.
    """

    @staticmethod
    def forward(ctx, x, w_enc, b_enc, w_dec, b_dec, k):
        n, d_sae = x.shape[0], w_enc.shape[1]
        pre = torch.addmm(b_enc, x, w_enc).clamp_min_(0).view(-1)
        flat = batch_topk_flat_indices(pre, n * k)
        values = pre[flat]
        keep = values > 0
        flat, values = flat[keep], values[keep]
        rows, latents = flat // d_sae, flat % d_sae
        crow = torch.zeros(n + 1, dtype=torch.int64, device=x.device)
        crow[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        x_hat = _csr(crow, latents, values, (n, d_sae)) @ w_dec + b_dec
        ctx.save_for_backward(x, w_enc, w_dec, crow, latents, values)
        ctx.mark_non_differentiable(latents)
        return x_hat, latents

    @staticmethod
    def backward(ctx, grad_x_hat, _grad_latents):
        x, w_enc, w_dec, crow, latents, values = ctx.saved_tensors
        n, d_sae = x.shape[0], w_enc.shape[1]
        codes = _csr(crow, latents, values, (n, d_sae))
        grad_b_dec = grad_x_hat.sum(0)
        grad_w_dec = codes.t().to_sparse_csr() @ grad_x_hat
        # d loss / d code value = <g[row], W_dec[latent]>, only at the active entries (all > 0, so ReLU passes).
        grad_values = torch.sparse.sampled_addmm(codes, grad_x_hat, w_dec.t(), beta=0.0).values()
        grad_codes = _csr(crow, latents, grad_values, (n, d_sae))
        grad_b_enc = torch.zeros(d_sae, dtype=x.dtype, device=x.device).index_add_(0, latents, grad_values)
        grad_w_enc = (grad_codes.t().to_sparse_csr() @ x).t()
        grad_x = grad_codes @ w_enc.t() if ctx.needs_input_grad[0] else None
        return grad_x, grad_w_enc, grad_b_enc, grad_w_dec, grad_b_dec, None


def batch_topk(sae: "BatchTopKSAE", x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n * k`` largest positive pre-activations of the batch, differentiable.

    Returns:
        ``(rows, latents, values)``: each of length ``<= n * k`` (zeros are dropped).
    """
    k = k or sae.config.k
    with torch.no_grad():
        pre = sae.pre_activations(x)
        top = torch.topk(pre.flatten(), min(x.shape[0] * k, pre.numel()), sorted=False)
        keep = top.values > 0
        flat = top.indices[keep]
        rows, latents = flat // sae.d_sae, flat % sae.d_sae
        values = top.values[keep]
    if torch.is_grad_enabled() and (x.requires_grad or sae.W_enc.requires_grad):
        # Gradient flows to the inputs as seen by the encoder: x * norm_scale.
        values = _SparseEncode.apply(values, x * sae.norm_scale, sae.W_enc, sae.b_enc, rows, latents)
    return rows, latents, values


def train_forward(sae: "BatchTopKSAE", x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pass: BatchTopK reconstruction ``(n, d_in)`` and the active latent ids, sparse throughout.

    Same function and gradients as :func:`batch_topk` followed by :meth:`BatchTopKSAE.decode_sparse`, several times faster
    (see ``benchmarks/sae_train.py``).
    """
    x_hat, latents = _BatchTopKAutoencode.apply(x * sae.norm_scale, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.config.k)
    return x_hat / sae.norm_scale, latents
