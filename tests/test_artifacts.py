"""Artifact batches: HDF5 round trip, Merkle proofs, and every way a batch can be bad.

A batch must read back with plain h5py and with h5dump (the HDF5 tools CI installs), verify
only with its executor's key, and fail loudly when truncated or edited.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from gonka_hpc.artifacts import FORMAT_VERSION, Inference, read_batch, write_batch
from gonka_hpc.errors import GonkaError, SignatureError
from gonka_hpc.identity import Identity
from gonka_hpc.merkle import EMPTY_ROOT, leaf_hash, merkle_proof, merkle_root, verify_proof

K = 5
EXEC = Identity.from_seed("uni-b", bytes([7]) * 32)


def _inference(i: int, n: int) -> Inference:
    rng = np.random.default_rng(i)
    return Inference(f"job-1:{i + 1}", rng.integers(0, 999, 6 + i).astype(np.int32),
                     rng.integers(0, 999, n).astype(np.int32),
                     -rng.random(n).astype(np.float32),
                     rng.integers(0, 999, (n, K)).astype(np.int32),
                     -rng.random((n, K)).astype(np.float32), 2**64 - 1 - i, 0.7, 0.9, 0, 16,
                     "length" if n == 16 else "stop")


def _write(path: Path, infs: list[Inference]):  # type: ignore[no-untyped-def]
    return write_batch(path, EXEC, epoch=1, job_id="job-1", shard_id="job-1-uni-b",
                       model_hash="m" * 64, engine="reference", engine_version="test",
                       dtype="float32", k=K, inferences=infs)


def test_roundtrip_verifies(tmp_path: Path) -> None:
    infs = [_inference(i, n) for i, n in enumerate([16, 3, 0, 9])]
    written = _write(tmp_path / "b.h5", infs)
    back = read_batch(tmp_path / "b.h5")
    back.verify(EXEC.public_hex)
    assert back.header == written.header
    assert back.header.n_tokens == 28 and back.header.n_requests == 4
    for a, b in zip(infs, back.inferences):
        assert a.request_id == b.request_id and a.seed == b.seed
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert a.leaf() == b.leaf()
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


def test_plain_h5py_layout(tmp_path: Path) -> None:
    _write(tmp_path / "b.h5", [_inference(0, 4), _inference(1, 2)])
    with h5py.File(tmp_path / "b.h5") as f:
        assert f.attrs["format_version"] == FORMAT_VERSION == 2 and f.attrs["executor"] == "uni-b"
        assert list(f["min_tokens"][()]) == [0, 0]
        assert list(f["output_offsets"][()]) == [0, 4, 6]
        assert f["topk_ids"].shape == (6, K) and f["topk_ids"].compression == "gzip"
        assert f["seed"].dtype == np.uint64 and int(f["seed"][0]) == 2**64 - 1


def test_h5dump_reads_it(tmp_path: Path) -> None:
    h5dump = shutil.which("h5dump")
    assert h5dump, "h5dump missing: install Debian's hdf5-tools (.ci/run does)"
    _write(tmp_path / "b.h5", [_inference(0, 4)])
    out = subprocess.run([h5dump, "-H", str(tmp_path / "b.h5")], capture_output=True,
                         text=True, check=True).stdout
    assert "topk_logprobs" in out and "merkle_root" in out


def test_wrong_key_and_edits_fail(tmp_path: Path) -> None:
    _write(tmp_path / "b.h5", [_inference(0, 4), _inference(1, 4)])
    with pytest.raises(SignatureError, match="signature"):
        read_batch(tmp_path / "b.h5").verify(Identity.generate("x").public_hex)
    with h5py.File(tmp_path / "b.h5", "r+") as f:
        f["output_ids"][1] = f["output_ids"][1] + 1  # one edited token
    with pytest.raises(SignatureError, match="Merkle root"):
        read_batch(tmp_path / "b.h5").verify(EXEC.public_hex)


def test_truncated_and_foreign_files_are_named(tmp_path: Path) -> None:
    _write(tmp_path / "b.h5", [_inference(0, 8)])
    data = (tmp_path / "b.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(GonkaError, match="t.h5"):
        read_batch(tmp_path / "t.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = 1
    with pytest.raises(GonkaError, match="not a gonka artifact batch"):
        read_batch(tmp_path / "other.h5")


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_merkle_proofs(n: int) -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(n)]
    root = merkle_root(leaves)
    for i in range(n):
        assert verify_proof(leaves[i], merkle_proof(leaves, i), root)
    assert not verify_proof(leaf_hash(b"x"), merkle_proof(leaves, 0), root)


def test_merkle_root_is_order_and_domain_sensitive() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert merkle_root([a, b]) != merkle_root([b, a])
    assert merkle_root([]) == EMPTY_ROOT
    # an internal node must not pass as a leaf (second-preimage resistance)
    assert merkle_root([a, b]) != merkle_root([leaf_hash(a + b)])
