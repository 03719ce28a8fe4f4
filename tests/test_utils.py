"""spotlib.utils and spotlib.paper.io: integer checks, the atomic writer, deterministic safetensors, loaders that name the file."""

from __future__ import annotations

import hashlib
import stat

import numpy as np
import pytest
import torch

from spotlib.utils import check_int, read_json
from spotlib.paper.io import atomic_path, config_from_spec, load_safetensors, read_safetensors_metadata, save_safetensors, torch_load, write_json


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), torch.tensor(3)])
def test_check_int_accepts_integer_likes(value):
    assert check_int(value, "n", 1) == 3 and type(check_int(value, "n", 1)) is int


@pytest.mark.parametrize("value, error, message", [
    (True, TypeError, "n must be an integer >= 1, got the bool True"),
    (2.0, TypeError, "n must be an integer >= 1, got float 2.0"),
    (0, ValueError, "n must be an integer >= 1, got 0"),
])
def test_check_int_refuses(value, error, message):
    with pytest.raises(error, match=message):
        check_int(value, "n", 1)


def test_atomic_path_keeps_the_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_outputs_are_readable_and_byte_identical(tmp_path):
    """safetensors writes a metadata mapping of several keys in a random order: the same tensors and
    metadata must still give the same bytes (DVC hashes them), and files must be 0644, not 0600."""
    tensors = {f"w{i}": torch.full((3,), float(i)) for i in range(12)}
    metadata = {f"key{i}": i for i in range(12)}
    digests = set()
    for i in range(4):
        save_safetensors(tensors, tmp_path / f"{i}.safetensors", metadata)
        digests.add(hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    path = tmp_path / "0.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert read_safetensors_metadata(path) == metadata
    assert all(torch.equal(load_safetensors(path)[k], v) for k, v in tensors.items())
    write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert stat.S_IMODE((tmp_path / "m.json").stat().st_mode) == 0o644
    assert read_json(tmp_path / "m.json") == {"b": 1, "a": 2}


@pytest.mark.parametrize("loader, name", [(load_safetensors, "x.safetensors"), (read_json, "x.json"),
                                          (torch_load, "state.pt")])
def test_loaders_name_the_file(tmp_path, loader, name):
    path = tmp_path / name
    with pytest.raises(FileNotFoundError, match=f"no such file: {path}; run the stage"):
        loader(path, "run the stage")
    path.write_bytes(b"\x00garbage{")
    with pytest.raises(ValueError, match=f"cannot read {path}"):
        loader(path)


def test_config_from_spec_lists_the_valid_keys():
    from spotlib.paper.train import TrainConfig

    assert config_from_spec(TrainConfig, {"epochs": 2}, "grid spec", mode="grid").epochs == 2
    with pytest.raises(ValueError, match=r"grid spec: unknown key\(s\) 'epoch'; valid keys: epochs, batch_size"):
        config_from_spec(TrainConfig, {"epoch": 2}, "grid spec", mode="grid")


class Pickled:
    """An object that torch.load(weights_only=True) refuses to unpickle."""

    a = 1


def test_torch_load_passes_on_a_weights_only_refusal(tmp_path):
    """A real checkpoint that pickles other objects is refused by weights_only=True with torch's own
    message (callers explain it); it is not reported as a corrupt file."""
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": Pickled()}, path)
    with pytest.raises(Exception, match="weights_only") as info:
        torch_load(path, weights_only=True)
    assert "cannot read" not in str(info.value)
    assert torch_load(path, weights_only=False)["extra"].a == 1
