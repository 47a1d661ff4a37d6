"""The rank-r products in the layout BLAS runs faster give the plain products' values, at narrow and wide ranks."""

import pytest
import torch

from lorakit.layers.rank_products import NARROW_RANK, add_rank_term_, grad_a, grad_b, times_b

RANKS = [1, 8, NARROW_RANK - 1, NARROW_RANK, 64]


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", RANKS)
def test_each_product_equals_the_plain_product(rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    tokens, fan_in, fan_out = 96, 40, 56
    x, g = torch.randn(tokens, fan_in, generator=gen), torch.randn(tokens, fan_out, generator=gen)
    A, B = torch.randn(rank, fan_in, generator=gen), torch.randn(fan_out, rank, generator=gen)
    h, grad_h = torch.randn(tokens, rank, generator=gen), torch.randn(tokens, rank, generator=gen)
    wide = torch.float64
    _close(times_b(g, B), (g.to(wide) @ B.to(wide)).float())
    _close(grad_b(g, h), (g.to(wide).T @ h.to(wide)).float())
    _close(grad_a(grad_h, x), (grad_h.to(wide).T @ x.to(wide)).float())


@pytest.mark.parametrize("rank", RANKS)
def test_products_accept_the_transposed_views_the_backward_hands_them(rank: int) -> None:
    """times_b's narrow result is a transposed view; grad_a and the input gradient's addmm_ take it as input."""
    gen = torch.Generator().manual_seed(100 + rank)
    x, g = torch.randn(64, 24, generator=gen), torch.randn(64, 32, generator=gen)
    A, B = torch.randn(rank, 24, generator=gen), torch.randn(32, rank, generator=gen)
    grad_h = times_b(g, B).mul_(0.5)
    _close(grad_a(grad_h, x), 0.5 * (g @ B).T @ x)
    grad_x = torch.randn(64, 24, generator=gen)
    want = grad_x + 0.5 * (g @ B) @ A
    _close(grad_x.addmm_(grad_h, A), want)


@pytest.mark.parametrize("rank", RANKS)
def test_add_rank_term_adds_in_place_and_keeps_the_output_contiguous(rank: int) -> None:
    gen = torch.Generator().manual_seed(200 + rank)
    out, h = torch.randn(48, 30, generator=gen), torch.randn(48, rank, generator=gen)
    B = torch.randn(30, rank, generator=gen)
    want = out + h @ B.T
    storage = out.data_ptr()
    result = add_rank_term_(out, h, B)
    assert result is out and out.data_ptr() == storage and out.is_contiguous()
    _close(out, want)
