"""ZCA whitening with torch.linalg, matching kornia's ``ZCAWhitening`` as the references use it.

Source: MTT (GeorgeCazenavette/mtt-distillation), DATM, PAD and DataDAM fit
``kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True)`` on the whole training set (N, C, H, W)
with kornia's defaults (dim=0, unbiased covariance):

1. flatten each image to a vector of length D = C*H*W;
2. mu = mean over samples; Sigma = (X - mu)^T (X - mu) / (N - 1);
3. Sigma = U S U^T; W = U diag(1 / sqrt(S + eps)) U^T; W^-1 = U diag(sqrt(S + eps)) U^T;
4. transform x -> (x - mu) W; inverse x -> x W^-1 + mu.

Here the covariance and the eigendecomposition run in float64 (``torch.linalg.eigh``, which equals
the SVD for a symmetric positive semi-definite matrix); mu, W and W^-1 are then stored in float32.
Transforms run in row batches so that memory stays bounded, and stay differentiable.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ['ZCA']

_BATCH = 4096


class ZCA:
    """A fitted ZCA whitening for images of one shape (C, H, W).

    Build it with :meth:`ZCA.fit` or :meth:`ZCA.from_state_dict`. Calling the object is
    :meth:`transform`.

    Attributes:
        mean: (D,) float32 per-pixel mean of the fitting images, D = C*H*W.
        whitening: (D, D) float32 symmetric matrix W.
        unwhitening: (D, D) float32 symmetric matrix W^-1.
        eps: the regulariser added to the eigenvalues.
        shape: (C, H, W) of the images it was fitted on.
    """

    def __init__(self, mean: Tensor, whitening: Tensor, unwhitening: Tensor, eps: float,
                 shape: tuple[int, int, int]) -> None:
        """Wrap precomputed statistics; prefer :meth:`fit` or :meth:`from_state_dict`.

        Args:
            mean: (D,) per-pixel mean.
            whitening: (D, D) W.
            unwhitening: (D, D) W^-1.
            eps: eigenvalue regulariser used for W.
            shape: (C, H, W) with C*H*W == D.

        Raises:
            ValueError: inconsistent shapes.
        """
        dim = shape[0] * shape[1] * shape[2]
        if mean.shape != (dim,) or whitening.shape != (dim, dim) or unwhitening.shape != (dim, dim):
            raise ValueError(f'ZCA statistics do not match image shape {tuple(shape)} (D={dim}): mean '
                             f'{tuple(mean.shape)}, whitening {tuple(whitening.shape)}, '
                             f'unwhitening {tuple(unwhitening.shape)}')
        self.mean = mean.to(torch.float32)
        self.whitening = whitening.to(torch.float32)
        self.unwhitening = unwhitening.to(torch.float32)
        self.eps = float(eps)
        self.shape = (int(shape[0]), int(shape[1]), int(shape[2]))
        self._copy_key: tuple | None = None
        self._copy: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def fit(cls, images: Tensor, eps: float = 0.1, batch_size: int = _BATCH) -> 'ZCA':
        """Fit the whitening on a set of images (kornia ``ZCAWhitening.fit`` semantics).

        Args:
            images: (N, C, H, W) images (N >= 2), any float dtype; the computation runs on their
                device in float64.
            eps: added to each covariance eigenvalue before the square root (the references use 0.1).
            batch_size: rows per chunk when accumulating the covariance.

        Returns:
            The fitted :class:`ZCA` (statistics on the images' device, float32).

        Raises:
            ValueError: ``images`` is not 4-D, has fewer than 2 samples, or ``eps`` <= 0.
        """
        if images.ndim != 4:
            raise ValueError(f'ZCA.fit expects (N, C, H, W) images, got shape {tuple(images.shape)}')
        if images.shape[0] < 2:
            raise ValueError(f'ZCA.fit needs at least 2 images, got {images.shape[0]}')
        if not eps > 0:
            raise ValueError(f'ZCA eps must be positive, got {eps}')
        with torch.no_grad():
            flat = images.detach().reshape(images.shape[0], -1)
            count, dim = flat.shape
            mean = torch.zeros(dim, dtype=torch.float64, device=flat.device)
            for chunk in flat.split(batch_size):
                mean += chunk.to(torch.float64).sum(dim=0)
            mean /= count
            cov = torch.zeros(dim, dim, dtype=torch.float64, device=flat.device)
            for chunk in flat.split(batch_size):
                centred = chunk.to(torch.float64) - mean
                cov.addmm_(centred.T, centred)
            cov /= count - 1
            eigenvalues, eigenvectors = torch.linalg.eigh(cov)
            del cov
            eigenvalues = eigenvalues.clamp_min(0.0) + eps
            whitening = (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
            unwhitening = (eigenvectors * eigenvalues.sqrt()) @ eigenvectors.T
        return cls(mean, whitening, unwhitening, eps, tuple(images.shape[1:]))

    def _matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """mean, W, W^-1 on ``device`` in ``dtype``; one converted copy is kept for reuse."""
        if self.mean.device == device and dtype == torch.float32:
            return self.mean, self.whitening, self.unwhitening
        key = (device, dtype)
        if self._copy_key != key:
            self._copy = None  # free the previous copy before making a new one
            self._copy = (self.mean.to(device, dtype), self.whitening.to(device, dtype),
                          self.unwhitening.to(device, dtype))
            self._copy_key = key
        return self._copy

    def _apply(self, x: Tensor, inverse: bool, batch_size: int) -> Tensor:
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f'ZCA was fitted on images of shape {self.shape}, got {tuple(x.shape)}')
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean, whitening, unwhitening = self._matrices(x.device, dtype)
        flat = x.to(dtype).reshape(-1, mean.shape[0])
        if inverse:
            out = [chunk @ unwhitening + mean for chunk in flat.split(batch_size)]
        else:
            out = [(chunk - mean) @ whitening for chunk in flat.split(batch_size)]
        result = out[0] if len(out) == 1 else torch.cat(out)  # split() yields >= 1 chunk
        return result.reshape(x.shape)

    def transform(self, x: Tensor, batch_size: int = _BATCH) -> Tensor:
        """Whiten images: ``(x - mean) @ W`` on flattened images.

        Args:
            x: (..., C, H, W) images in the fitting space (e.g. [0, 1] pixels); any device.
            batch_size: rows per matrix product.

        Returns:
            Whitened images, same shape, device and (float) dtype as ``x``; differentiable.

        Raises:
            ValueError: the trailing (C, H, W) differ from the fitted shape.
        """
        return self._apply(x, inverse=False, batch_size=batch_size)

    __call__ = transform

    def inverse(self, x: Tensor, batch_size: int = _BATCH) -> Tensor:
        """Undo the whitening: ``x @ W^-1 + mean`` on flattened images.

        Args:
            x: (..., C, H, W) whitened images; any device.
            batch_size: rows per matrix product.

        Returns:
            Images in the fitting space, same shape, device and dtype as ``x``; differentiable.

        Raises:
            ValueError: the trailing (C, H, W) differ from the fitted shape.
        """
        return self._apply(x, inverse=True, batch_size=batch_size)

    def to(self, device: torch.device | str) -> 'ZCA':
        """Return a copy whose statistics live on ``device``."""
        return ZCA(self.mean.to(device), self.whitening.to(device), self.unwhitening.to(device),
                   self.eps, self.shape)

    def state_dict(self) -> dict:
        """Tensors and plain values only, so ``torch.load(..., weights_only=True)`` can read it.

        Returns:
            ``{'mean', 'whitening', 'unwhitening', 'eps', 'shape'}`` with CPU tensors.
        """
        return {'mean': self.mean.cpu(), 'whitening': self.whitening.cpu(),
                'unwhitening': self.unwhitening.cpu(), 'eps': self.eps, 'shape': list(self.shape)}

    @classmethod
    def from_state_dict(cls, state: dict) -> 'ZCA':
        """Rebuild a :class:`ZCA` from :meth:`state_dict` output.

        Raises:
            KeyError: a key is missing.
            ValueError: inconsistent shapes.
        """
        return cls(state['mean'], state['whitening'], state['unwhitening'], state['eps'],
                   tuple(state['shape']))

    def __repr__(self) -> str:
        return f'ZCA(shape={self.shape}, eps={self.eps}, device={self.mean.device})'
