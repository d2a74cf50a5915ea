"""Reversed phase-encoding distortion fit (SPEC §5) against an independently simulated field."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from bids_deepanat import sdc

SHAPE = (36, 44, 28)
AXIS = 1


def _object(shape=SHAPE) -> np.ndarray:
    """A smooth head-like object: an ellipsoid with bright and dark blobs inside, 0 outside."""
    idx = np.indices(shape, dtype=float)
    centre = (np.array(shape) - 1) / 2.0
    radii = np.array(shape) * 0.38
    inside = (((idx - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    rng = np.random.default_rng(3)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    body = 1.0 + 1.5 * texture / texture.std()
    return ndimage.gaussian_filter(np.where(inside, np.clip(body, 0.2, None), 0.0), 0.7)


def _field(shape=SHAPE) -> np.ndarray:
    """A smooth displacement (voxels along AXIS): a 3-voxel bump off-centre, like the frontal
    sinus field, plus a gentle gradient."""
    idx = np.indices(shape, dtype=float)
    centre = np.array([0.5, 0.7, 0.4]) * (np.array(shape) - 1)
    r2 = ((idx - centre[:, None, None, None]) ** 2).sum(0)
    return 3.0 * np.exp(-r2 / (2 * 7.0**2)) + 0.5 * (idx[2] / shape[2] - 0.5)


def _distort(rho: np.ndarray, disp: np.ndarray, axis: int, oversample: int = 8) -> np.ndarray:
    """Forward EPI model by splatting: each sub-voxel of ``rho`` lands at ``x + d(x)``.

    Independent of the module's resampling and inversion: it moves signal (conserving it) the
    way the scanner does, so stretched regions come out dimmer and compressed ones brighter.
    """
    rho_l = np.moveaxis(rho, axis, -1).reshape(-1, rho.shape[axis])
    d_l = np.moveaxis(disp, axis, -1).reshape(-1, rho.shape[axis])
    n = rho_l.shape[1]
    x = np.arange(n, dtype=float)
    sub = (np.arange(n * oversample) + 0.5) / oversample - 0.5
    out = np.zeros_like(rho_l)
    for row in range(rho_l.shape[0]):
        value = np.interp(sub, x, rho_l[row]) / oversample
        y = sub + np.interp(sub, x, d_l[row])
        lo = np.floor(y).astype(int)
        w = y - lo
        for pos, weight in ((lo, 1 - w), (lo + 1, w)):
            ok = (pos >= 0) & (pos < n)
            np.add.at(out[row], pos[ok], value[ok] * weight[ok])
    moved = out.reshape(np.moveaxis(rho, axis, -1).shape)
    return np.moveaxis(moved, -1, axis)


@pytest.fixture(scope="module")
def pair():
    rho, disp = _object(), _field()
    up = _distort(rho, disp, AXIS)  # e.g. dir-PA
    down = 0.7 * _distort(rho, -disp, AXIS)  # reversed run, another receiver gain
    return rho, disp, up, down


def test_simulation_conserves_signal(pair):
    rho, _, up, down = pair
    assert abs(up.sum() / rho.sum() - 1) < 0.01
    assert abs(down.sum() / (0.7 * rho.sum()) - 1) < 0.01
    assert np.abs(up - rho).max() > 0.5  # the distortion is visible


def test_recovers_the_simulated_displacement(pair):
    rho, disp, up, down = pair
    fit = sdc.estimate_displacement(up, down, axis=AXIS, voxel_mm=2.5)
    inside = ndimage.binary_erosion(rho > 0.3, iterations=2)
    assert np.percentile(np.abs(disp)[inside], 95) > 2.0  # a field worth finding
    error = np.abs(fit.displacement - disp)[inside]  # measured: median 0.013, 95th pct 0.063
    assert np.median(error) < 0.05, np.median(error)
    assert np.percentile(error, 95) < 0.2, np.percentile(error, 95)
    assert fit.correlation_after > 0.99 > fit.correlation_before + 0.05
    # The unwarped b=0 is the undistorted object (up to the gains, mean of 1 and 0.7).
    r_before = np.corrcoef(up[inside], rho[inside])[0, 1]
    r_after = np.corrcoef(fit.unwarped[inside], rho[inside])[0, 1]
    assert r_after > 0.99 and r_after > r_before + 0.05, (r_before, r_after)


def test_order_of_the_pair_flips_the_sign(pair):
    _, _, up, down = pair
    forward = sdc.estimate_displacement(up, down, axis=AXIS, voxel_mm=2.5).displacement
    backward = sdc.estimate_displacement(down, up, axis=AXIS, voxel_mm=2.5).displacement
    assert np.abs(forward + backward).max() < 0.1


def test_readout_ratio_scales_the_reverse_displacement():
    rho, disp = _object(), _field()
    up = _distort(rho, disp, AXIS)
    down = _distort(rho, -2.0 * disp, AXIS)  # twice the readout time
    fit = sdc.estimate_displacement(up, down, axis=AXIS, voxel_mm=2.5, ratio=2.0)
    inside = ndimage.binary_erosion(rho > 0.3, iterations=2)
    assert np.median(np.abs(fit.displacement - disp)[inside]) < 0.15


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_resampling_moves_along_the_given_axis(axis):
    """Against SciPy on every axis: a smooth displacement along ``axis`` only."""
    rho = _object()
    disp = _field() * 0.8
    coords = np.indices(SHAPE, dtype=float)
    coords[axis] += disp
    expected = ndimage.map_coordinates(rho, coords, order=1, mode="nearest")
    np.testing.assert_allclose(sdc.unwarp(rho, disp, axis, modulate=False), expected, atol=1e-5)
    positions = sdc.true_positions(disp, axis)
    seen = positions[axis] + ndimage.map_coordinates(disp, positions, order=1, mode="nearest")
    inner = [slice(None)] * 3
    inner[axis] = slice(2, -2)
    assert np.abs(seen - np.indices(SHAPE)[axis])[tuple(inner)].max() < 1e-6


def test_true_positions_invert_the_displacement():
    disp = _field()
    coords = sdc.true_positions(disp, AXIS)
    seen = coords[AXIS] + ndimage.map_coordinates(disp, coords, order=1, mode="nearest")
    assert np.abs(seen - np.indices(SHAPE)[AXIS])[:, 2:-2].max() < 1e-6
    np.testing.assert_array_equal(coords[0], np.indices(SHAPE)[0])


def test_unwarping_the_distorted_image_returns_the_object(pair):
    rho, disp, up, _ = pair
    restored = sdc.unwarp(up, disp, AXIS)
    inside = ndimage.binary_erosion(rho > 0.3, iterations=2)
    assert np.abs(restored - rho)[inside].max() < 0.1 * rho.max()


def test_phase_encoding_and_fieldmap_units():
    pe = sdc.PhaseEncoding("j-", 0.05)
    assert (pe.axis, pe.sign) == (1, -1)
    assert pe.is_reverse_of(sdc.PhaseEncoding("j")) and not pe.is_reverse_of(sdc.PhaseEncoding("i"))
    # In a j- run over a 50 ms readout, 2.5 voxels towards +j is -50 Hz, towards -j +50 Hz.
    assert sdc.fieldmap_hz(np.full((2, 2, 2), 2.5), pe)[0, 0, 0] == pytest.approx(-50.0)
    assert sdc.fieldmap_hz(np.full((2, 2, 2), -2.5), pe)[0, 0, 0] == pytest.approx(50.0)
    assert sdc.fieldmap_hz(np.ones((2, 2, 2)), sdc.PhaseEncoding("j")) is None
    assert sdc.readout_time({"TotalReadoutTime": 0.04}, (10, 10, 10)) == 0.04
    assert sdc.readout_time({"EffectiveEchoSpacing": 0.001, "PhaseEncodingDirection": "j"},
                            (64, 72, 40)) == pytest.approx(0.071)
    assert sdc.readout_time({}, (10, 10, 10)) is None
    assert sdc.readout_ratio(sdc.PhaseEncoding("j", 0.05), sdc.PhaseEncoding("j-", 0.1)) == 2.0
    with pytest.raises(ValueError):
        sdc.PhaseEncoding("y")


def test_rejects_mismatched_or_empty_pairs():
    with pytest.raises(ValueError, match="one grid"):
        sdc.estimate_displacement(np.ones(SHAPE), np.ones((4, 4, 4)), axis=1, voxel_mm=2.0)
    with pytest.raises(ValueError, match="no signal"):
        sdc.estimate_displacement(np.zeros(SHAPE), np.zeros(SHAPE), axis=1, voxel_mm=2.0)
