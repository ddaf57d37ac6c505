"""Transfer-loss registry: names, lookup errors, keyword binding."""

import pytest
import torch

import nst_det.losses as L
from nst_det.losses import (
    TRANSFER_LOSS_REGISTRY,
    DeFeatAdapter,
    FGDGlobal,
    FGFIAdapter,
    MGDGenerator,
    build_transfer_loss,
    cwd_loss,
    defeat_loss,
    dkd_loss,
    fgd_loss,
    fgfi_loss,
    get_transfer_loss,
    mgd_loss,
    pkd_loss,
    reviewkd_loss,
)

EXPECTED = {
    "nst": L.nst_loss,
    "kd": L.kd_loss,
    "fitnet": L.fitnet_loss,
    "at": L.at_loss,
    "sp": L.sp_loss,
    "mmd": L.mmd_loss,
    "gaussian_w2": L.gaussian_w2_loss,
    "gaussian_kl": L.gaussian_kl_loss,
    "class_gaussian_w2": L.class_gaussian_w2_loss,
    "class_gaussian_kl": L.class_gaussian_kl_loss,
    "w2": L.w2_loss,
    "class_w2": L.class_w2_loss,
    "sinkhorn": L.sinkhorn_loss,
    "cwd": L.cwd_loss,
    "pkd": L.pkd_loss,
    "mgd": L.mgd_loss,
    "fgd": L.fgd_loss,
    "defeat": L.defeat_loss,
    "fgfi": L.fgfi_loss,
    "reviewkd": L.reviewkd_loss,
    "dkd": L.dkd_loss,
}


def test_every_loss_is_registered_under_its_short_name():
    assert dict(TRANSFER_LOSS_REGISTRY) == EXPECTED
    for name, fn in EXPECTED.items():
        assert get_transfer_loss(name) is fn


def test_unknown_name_raises_and_lists_known_names():
    with pytest.raises(KeyError) as err:
        get_transfer_loss("nts")
    assert "'nts'" in str(err.value) and "nst" in str(err.value) and "sinkhorn" in str(err.value)


def test_build_binds_keywords_and_checks_them():
    f_s, f_t = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    fn = build_transfer_loss("nst", kernel="linear")
    torch.testing.assert_close(fn(f_s, f_t), L.nst_loss(f_s, f_t, kernel="linear"))
    assert build_transfer_loss("kd") is L.kd_loss
    z = torch.randn(3, 4)
    torch.testing.assert_close(
        build_transfer_loss("kd", T=2.0)(z, z.flip(1)), L.kd_loss(z, z.flip(1), T=2.0)
    )
    with pytest.raises(TypeError, match="kd"):
        build_transfer_loss("kd", temperature=4.0)


def test_registry_names_build_modules_and_binding():
    table = {
        "cwd": cwd_loss,
        "pkd": pkd_loss,
        "mgd": mgd_loss,
        "fgd": fgd_loss,
        "defeat": defeat_loss,
        "fgfi": fgfi_loss,
        "reviewkd": reviewkd_loss,
        "dkd": dkd_loss,
    }
    for name, fn in table.items():
        assert get_transfer_loss(name) is fn
        assert name in L.__doc__
    builders = {"mgd": MGDGenerator, "fgd": FGDGlobal, "defeat": DeFeatAdapter, "fgfi": FGFIAdapter}
    for name, cls in builders.items():
        m = table[name].build_module(3, 4)
        assert isinstance(m, cls)
    for name in ("cwd", "pkd", "dkd"):
        assert not hasattr(table[name], "build_module")
    fn = build_transfer_loss("fgd", alpha=1e-3, temperature=0.5)
    assert fn.keywords == {"alpha": 1e-3, "temperature": 0.5}
    with pytest.raises(TypeError):
        build_transfer_loss("mgd", mask_ration=0.5)
