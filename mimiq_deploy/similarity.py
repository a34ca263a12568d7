"""SSIM with one global window: the statistics of a whole map (official MimiQ code's choice).

Used by L_IHC (synthesis: heads' attention maps of one query, over the patch grid or a window) and by
L_HAD (fine-tuning: head outputs, statistics over tokens per channel).
"""
import torch
from pytorch_msssim import ssim

C1, C2 = 0.01 ** 2, 0.03 ** 2  # SSIM constants for data range 1


def global_ssim(x: torch.Tensor, y: torch.Tensor, dim: int = -1, luminance: bool = True,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM of x and y with statistics taken over `dim` (reduced away).

    weights (broadcastable to x, summing to 1 along dim): weighted means, variances, covariance."""
    def mean(t, keepdim=False):
        return t.mean(dim, keepdim=keepdim) if weights is None else (t * weights).sum(dim, keepdim=keepdim)
    mx, my = mean(x, True), mean(y, True)
    dx, dy = x - mx, y - my
    vx, vy, cov = mean(dx * dx), mean(dy * dy), mean(dx * dy)
    cs = (2 * cov + C2) / (vx + vy + C2)
    if not luminance:
        return cs
    mx, my = mx.squeeze(dim), my.squeeze(dim)
    return (2 * mx * my + C1) / (mx * mx + my * my + C1) * cs


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo + 1e-8)


def head_pair_ssim(logits: torch.Tensor, grid: tuple[int, int], prefix: int, window: int = 0,
                   keys: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM between every pair of heads' attention maps for each spatial query.

    logits: (B, H, N, N) per-head logits with `prefix` leading non-spatial tokens (CLS), which are
    excluded as query and as key. Each head's row is min-max normalized and seen as a map on
    the grid (the patch grid, or a window). window 0: one global window; odd window > 1: pytorch-msssim's
    Gaussian window. keys (window attention): a (W, N, N) bool mask of each query's valid keys, logits
    holding W windows per image as (B * W, H, N, N); minmax and SSIM statistics are over valid keys only
    (global window only). Returns (B, pairs, P) SSIM values (B * W rows with keys).
    """
    if keys is not None:
        return _masked_head_pair_ssim(logits, keys)
    maps = minmax(logits[:, :, prefix:, prefix:])              # (B, H, P, P)
    b, h, p, _ = maps.shape
    i, j = torch.triu_indices(h, h, offset=1, device=maps.device)
    a, c = maps[:, i], maps[:, j]                              # (B, pairs, P, P)
    if window <= 1:
        return global_ssim(a, c, dim=-1)
    shape = (-1, 1, *grid)
    s = ssim(a.reshape(shape), c.reshape(shape), data_range=1.0, size_average=False, win_size=window)
    return s.view(b, len(i), p)


def _masked_head_pair_ssim(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """head_pair_ssim's global window over each query's valid keys (Swin's shifted windows)."""
    n_win, n = keys.shape[0], logits.shape[-1]
    h = logits.shape[1]
    x = logits.reshape(-1, n_win, h, n, n)                     # (B, W, H, N, N)
    valid = keys.view(1, n_win, 1, n, n)
    lo = x.masked_fill(~valid, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    maps = ((x - lo) / (hi - lo + 1e-8)).masked_fill(~valid, 0.0)
    weights = valid.to(maps.dtype) / valid.sum(-1, keepdim=True)
    i, j = torch.triu_indices(h, h, offset=1, device=maps.device)
    s = global_ssim(maps[:, :, i], maps[:, :, j], dim=-1, weights=weights)   # (B, W, pairs, N)
    return s.reshape(-1, len(i), n)
