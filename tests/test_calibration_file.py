"""The calibration file is untrusted input like a cache: fields validated, datasets derived and checked before they are
read, digest verified, values range-checked; every refusal is one line. And it is written atomically."""
import h5py
import numpy as np
import pytest

from calib_helpers import write_synthetic_calibration
from compactor.errors import CalibrationError
from compactor.models import load_model
from compactor.storage import schema
from compactor.storage.calibration_file import FORMAT, VERSION, check_calibration_model, read_calibration


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.fixture
def cal_path(tmp_path, lm):
    return write_synthetic_calibration(tmp_path / "cal.h5", lm)


def edit(path, recompute: bool, meta_changes=None, dataset=None):
    """Change meta fields (None deletes) and/or one dataset (name, new array or None to delete)."""
    with h5py.File(path, "r+") as f:
        meta = schema.parse_json(f.attrs["meta"].decode())
        for k, v in (meta_changes or {}).items():
            meta.pop(k) if v is None else meta.__setitem__(k, v)
        text = schema.canonical_json(meta).encode()
        del f.attrs["meta"]
        f.attrs.create("meta", np.array(text, dtype=f"S{len(text)}"))
        if dataset:
            name, arr = dataset
            if name in f:
                del f[name]
            if arr is not None:
                f[name] = arr
        if recompute:
            data = {k: f[k][()] for k in f}
            digest = schema.container_digest(FORMAT, VERSION, meta, data)
            del f.attrs["digest_sha256"]
            f.attrs.create("digest_sha256", np.array(digest.encode(), dtype="S64"))


def test_round_trip_and_accessors(cal_path, lm):
    cal = read_calibration(cal_path)
    check_calibration_model(cal, lm)
    assert cal.phase_names == ["prompt", "think", "answer"] and cal.codebook_bits == [2, 3, 4]
    assert cal.bits(4.0).shape == (2, 2) and cal.bits(4.0, phased=True).shape == (2, 3, 2) and cal.bits(3.5) is None
    assert cal.codebook("keys", 0, 5) is None
    layer_book = cal.codebook("keys", 0, 3)
    assert np.array_equal(cal.codebook("keys", 0, 3, phase=0), layer_book)  # phase 0 does not use its own
    assert not np.array_equal(cal.codebook("keys", 0, 3, phase=1), layer_book)  # think phase does
    assert len(cal.digest) == 64


def test_flipped_byte_and_unrecomputed_edit_fail_the_digest(cal_path):
    edit(cal_path, recompute=False, meta_changes={"created": "yesterday"})
    with pytest.raises(CalibrationError, match="digest"):
        read_calibration(cal_path)


@pytest.mark.parametrize("changes,dataset,msg", [
    ({"surprise": 1}, None, "unknown meta"), ({"num_layers": "2"}, None, "must be an integer"),
    ({"defaults": {"codebooks": True}}, None, "defaults is malformed"),
    ({"defaults_split": {"codebooks": True, "layer_bits": True, "phase_bits": True, "head_budgets": True,
                         "budget": "layer"}}, None, "defaults_split is malformed"),
    ({"defaults": {"codebooks": True, "layer_bits": True, "phase_bits": True, "head_budgets": True,
                   "budget": "layer", "head_power": 1.5}}, None, "defaults is malformed"),
    ({"defaults": {"codebooks": True, "layer_bits": True, "phase_bits": True, "head_budgets": True,
                   "budget": "layer", "head_power": 1}}, None, "defaults is malformed"),
    ({"allocation": {"avg_bits": [3.0, 4.0], "bit_options": [2, 9]}}, None, "allocation is malformed"),
    ({"codebooks": {"bits": [3, 2, 4], "phase_gain": 0.05}}, None, "codebooks is malformed"),
    ({"phases": {"names": ["a", "b"], "markers": [["x"], ["y"]], "fallback_fraction": 0.7}}, None,
     "phases is malformed"),
    ({"num_kv_heads": 3}, None, "shape"), ({"model_weights": None}, None, "lacks required"),
    (None, ("head_weights", -np.ones((2, 2), np.float32)), "positive"),
    (None, ("bits_document", np.full((2, 2, 2), 7, np.uint8)), "outside bit_options"),
    (None, ("codebook_keys_b2", np.zeros((2, 4), np.float32)), "ascending"),
    (None, ("rho", np.full((2, 2, 4, 2, 2), 2.0, np.float32)), "outside"),
    (None, ("rho", np.full((2, 2, 4, 2, 2), np.nan, np.float32)), "non-finite"),
    (None, ("head_weights", None), "missing"), (None, ("extra", np.zeros(3)), "unexpected"),
    (None, ("head_weights", np.ones((2, 2), np.float64)), "dtype"),
])
def test_forged_files_refused_with_one_line(cal_path, changes, dataset, msg):
    edit(cal_path, recompute=True, meta_changes=changes, dataset=dataset)
    with pytest.raises(CalibrationError, match=msg) as e:
        read_calibration(cal_path)
    assert "\n" not in str(e.value)


def test_not_a_calibration(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        read_calibration(tmp_path / "none.h5")
    (tmp_path / "x.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(CalibrationError, match="not a readable"):
        read_calibration(tmp_path / "x.h5")
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f.attrs["format"] = np.bytes_("compactor-kv")
    with pytest.raises(CalibrationError, match="not a compactor calibration file"):
        read_calibration(tmp_path / "y.h5")


def test_calibration_for_another_model_refused(tmp_path, lm, tiny_models):
    cal = read_calibration(write_synthetic_calibration(tmp_path / "cal.h5", lm))
    other = load_model(str(tiny_models["qwen2"]))  # same layout, other weights and config
    with pytest.raises(CalibrationError, match="was made for model") as e:
        check_calibration_model(cal, other)
    assert "\n" not in str(e.value)
    from conftest import make_tiny_model

    bigger = load_model(str(make_tiny_model(tmp_path / "l3", "llama", num_hidden_layers=3)))
    with pytest.raises(CalibrationError, match="3 layers|2 layers"):
        check_calibration_model(cal, bigger)


def test_atomic_write_leaves_nothing_on_a_refused_file(tmp_path, lm):
    with pytest.raises(CalibrationError):
        write_synthetic_calibration(tmp_path / "cal.h5", lm, defaults={"codebooks": 1})
    assert list(tmp_path.iterdir()) == []
