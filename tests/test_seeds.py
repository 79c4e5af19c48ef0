import hashlib

import pytest

from fastcal._seeds import derived_seed


def test_derived_seed_reads_eight_digest_bytes_per_part():
    digest = hashlib.sha256(b"fastcal-view:3:17").digest()
    for part in range(4):
        raw = int.from_bytes(digest[8 * part : 8 * part + 8], "little")
        assert derived_seed("fastcal-view:3:17", part) == raw % 2**63
    seeds = {derived_seed(f"fastcal-batches:1:{epoch}") for epoch in range(50)}
    assert len(seeds) == 50 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="part: expected 0, 1, 2 or 3"):
        derived_seed("x", 4)
