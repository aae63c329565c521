"""The span of a set of eigenvectors: one orthonormal basis for the training loss and the fusion.

Both the spectral shape loss (``sazs.train.losses``) and the ``project`` fusion
(``sazs.eval.fusion``) project class probabilities on span(V) of an image's eigenvectors,
so both take the basis from :func:`orthonormal_basis` and agree on what the span is.
"""

from __future__ import annotations

import torch


def orthonormal_basis(vectors: torch.Tensor, valid: torch.Tensor | None = None, rtol: float = 1e-4) -> torch.Tensor:
    """Orthonormal basis (..., N, K) of the span of K vectors (..., K, N), batched over leading dims.

    Entries outside ``valid`` (..., N) are zeroed first (the padding of a crop). QR does the
    work; a set whose vectors are (numerically) dependent — a column of R below ``rtol`` x the
    largest vector norm, e.g. after a small crop or an upsampling — is redone by SVD, keeping
    the directions with singular value above ``rtol`` x the largest and returning zero columns
    for the rest. The basis never holds a direction outside span(V), and its shape does not
    depend on the rank, so images batch. float64 input stays float64; anything else is float32.
    """
    v = vectors.transpose(-1, -2)
    v = v if v.dtype == torch.float64 else v.float()
    if valid is not None:
        v = v * valid.unsqueeze(-1).to(v.dtype)
    lead = v.shape[:-2]
    v = v.reshape(-1, *v.shape[-2:])
    q, r = torch.linalg.qr(v, mode="reduced")
    d = r.diagonal(dim1=-2, dim2=-1).abs()
    scale = v.norm(dim=1).amax(-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    deficient = (d < rtol * scale).any(-1)
    if deficient.any():
        q = q.clone()
        for b in torch.nonzero(deficient).flatten().tolist():
            u, s, _ = torch.linalg.svd(v[b], full_matrices=False)
            keep = s > rtol * s[0].clamp_min(torch.finfo(v.dtype).tiny)
            q[b] = u * keep.to(u.dtype)
    return q.reshape(*lead, *q.shape[-2:])
