"""Checkpoint-file fuzz: truncated, bit-flipped, spliced files and wrong cfg values.

`checkpoint.load` (and `load_meta`) must raise CheckpointError and nothing else; the registry
turns that into NOT_FOUND with a one-line message that names no server path.
"""

from __future__ import annotations

import collections
import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progsae.sae import checkpoint
from progsae.server.errors import ServiceError, Status
from progsae.server.registry import Registry, RegistryConfig
from tests.support import synthetic as testing

FUZZ = settings(deadline=None, database=None, max_examples=100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FILES = [checkpoint.WEIGHTS, checkpoint.ORDERING, checkpoint.CFG, checkpoint.METRICS]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(allow_nan=True),
              st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)
CFG_KEYS = ["architecture", "d_in", "d_sae", "k", "granularities", "scale", "format_version", "layer", "model",
            "training_tokens", "extra"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckfuzz")
    testing.make_checkpoint(root / "ok", d=8, m=32, k=4)
    testing.make_checkpoint(root / "other", d=8, m=64, k=4, seed=5)
    return root


def fresh(pristine, tmp_path_factory):
    dst = tmp_path_factory.mktemp("case") / "ck"
    shutil.copytree(pristine / "ok", dst)
    return dst


def must_fail_cleanly(path) -> None:
    """load() either succeeds or raises CheckpointError (never another exception type)."""
    try:
        ck = checkpoint.load(path, ordering="mean_sq")
    except checkpoint.CheckpointError as e:
        assert "\n" not in str(e)
    else:  # a mutation that left the data intact (e.g. a flip in JSON whitespace) still loads whole
        assert ck.sae.W_dec.shape[0] == ck.meta.d_sae
    # through the registry: NOT_FOUND (or the id check), one line, no absolute path
    reg_root = path.parent
    try:
        Registry(RegistryConfig(root=str(reg_root), models=(path.name,))).get(path.name)
    except ServiceError as e:
        assert e.status in (Status.NOT_FOUND, Status.INVALID_ARGUMENT)
        assert str(reg_root) not in e.message and "\n" not in e.message, e.message


def test_truncated(pristine, tmp_path_factory, fuzz_cases):
    seen: collections.Counter[str] = collections.Counter()

    @settings(FUZZ)
    @given(which=st.sampled_from(FILES), frac=st.floats(0, 0.999))
    def case(which, frac):
        p = fresh(pristine, tmp_path_factory)
        data = (p / which).read_bytes()
        (p / which).write_bytes(data[:int(len(data) * frac)])
        seen[which] += 1
        if which != checkpoint.METRICS:
            with pytest.raises(checkpoint.CheckpointError):
                checkpoint.load(p, ordering="mean_sq")
        must_fail_cleanly(p)

    case()
    fuzz_cases["checkpoint"]["truncate"] += seen.total()
    assert set(seen) == set(FILES) and seen.total() >= 50, seen


def test_bit_flipped(pristine, tmp_path_factory, fuzz_cases):
    seen: collections.Counter[str] = collections.Counter()

    @settings(FUZZ, max_examples=200)
    @given(which=st.sampled_from(FILES), pos=st.floats(0, 0.9999), bit=st.integers(0, 7), flips=st.integers(1, 3))
    def case(which, pos, bit, flips):
        p = fresh(pristine, tmp_path_factory)
        data = bytearray((p / which).read_bytes())
        for j in range(flips):
            i = (int(len(data) * pos) + 97 * j) % len(data)
            data[i] ^= 1 << bit
        (p / which).write_bytes(bytes(data))
        seen[which] += 1
        must_fail_cleanly(p)

    case()
    fuzz_cases["checkpoint"]["bitflip"] += seen.total()
    assert set(seen) == set(FILES) and seen.total() >= 100, seen


@pytest.mark.parametrize("where", ["progsae", "top"])
@pytest.mark.parametrize("key", CFG_KEYS)
def test_wrong_cfg(pristine, tmp_path_factory, fuzz_cases, key, where):
    """Every cfg key, in our block and as a SAELens-style top-level field, gets fuzzed values
    (one test per key, so coverage of the keys does not depend on what hypothesis samples)."""
    seen = 0

    @settings(FUZZ, max_examples=10)
    @given(value=JSON_VALUES)
    def case(value):
        nonlocal seen
        p = fresh(pristine, tmp_path_factory)
        cfg = json.loads((p / checkpoint.CFG).read_text())
        if where == "progsae":
            cfg["progsae"][key] = value
        else:  # a SAELens-style cfg (no progsae block) with a fuzzed top-level field
            cfg.pop("progsae")
            cfg[key] = value
        (p / checkpoint.CFG).write_text(json.dumps(cfg))
        seen += 1
        must_fail_cleanly(p)

    case()
    fuzz_cases["checkpoint"]["cfg"] += seen
    assert seen >= 5, seen


@pytest.mark.parametrize("which", [checkpoint.WEIGHTS, checkpoint.ORDERING, checkpoint.CFG])
def test_file_from_another_checkpoint(pristine, tmp_path_factory, fuzz_cases, which):
    """A file spliced from a checkpoint of another width: caught by shape checks, not by luck."""
    p = fresh(pristine, tmp_path_factory)
    shutil.copy(pristine / "other" / which, p / which)
    fuzz_cases["checkpoint"]["splice"] += 1
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load(p, ordering="mean_sq")
    must_fail_cleanly(p)
