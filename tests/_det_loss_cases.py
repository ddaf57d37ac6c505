"""Shared cases of the detection-loss tests: float64 random tensors, modules with random
weights, and hand-made GT boxes with the FGD masks they give.
"""

import torch

D = torch.float64


def _rand(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _perturb(module, seed):
    """Give every parameter of module random values (zero-initialised convs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------- hand-made boxes
# FGD level: stride 4, 6 x 8 grid (a 24 x 32 padded image).
FGD_BOXES = [
    torch.tensor(
        [
            [4.0, 4.0, 12.0, 8.0],  # A: grid (1,1)-(3,2): cols 1..3, rows 1..2, 1/6
            [8.0, 4.0, 10.0, 6.0],  # B inside A's right part: cols 2..3, rows 1..2, 1/4
            [28.0, 20.0, 32.0, 24.0],  # on the padded image's corner: cell (5, 7), 1/(2*2)
            [-4.0, -4.0, 2.0, 2.0],  # partly outside: rows/cols -1..1 -> 1/9 on (0..1, 0..1)
        ],
        dtype=D,
    ),
    torch.zeros(0, 4, dtype=D),
]


def _fgd_expected():
    fg = torch.zeros(2, 6, 8, dtype=D)
    fg[0, 0, 0] = fg[0, 0, 1] = fg[0, 1, 0] = 1 / 9
    fg[0, 1, 1] = fg[0, 2, 1] = 1 / 6  # A beats the outside box (1/6 > 1/9)
    fg[0, 1:3, 2:4] = 1 / 4  # B, the smaller box, wins over A
    fg[0, 5, 7] = 1 / 4
    bg = (fg == 0).to(D)
    bg[0] /= 38  # 48 cells, 10 covered
    bg[1] /= 48
    return fg, bg


# DeFeat levels: stride 4 (p2) and 8 (p3), an 8 x 8 grid on p2 (a 32 x 32 padded image).
DEFEAT_BOXES = [
    torch.tensor(
        [
            [6.5, 4.5, 14.7, 11.9],  # level 0; trunc(/4) = (1,1,3,2): row 1, cols 1..2
            [0.0, 0.0, 150.0, 150.0],  # level 1 (p3): not on p2
            [20.0, 8.0, 21.0, 30.0],  # thinner than a cell: single cell (2, 5)
            [28.0, 28.0, 40.0, 40.0],  # over the padded image's corner: (7, 7)
            [-6.0, 12.0, 5.0, 17.0],  # partly left of the image: (3, 0)
        ]
    ),
    torch.zeros(0, 4),
]
