"""int4 pack/unpack: exact round trips, a fixed byte layout, CPU and (interpreted) Triton agree bit for bit."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from quarot_fx.kernels import pack_int4, unpack_int4


def values(shape, seed=0):
    return torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)


@given(rows=st.integers(1, 5), length=st.integers(1, 70), seed=st.integers(0, 100))
def test_round_trip_is_exact_for_any_length(rows, length, seed):
    q = values((rows, length), seed)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, (length + 1) // 2)
    assert torch.equal(unpack_int4(packed, length), q)


def test_byte_layout_low_nibble_first_twos_complement():
    q = torch.tensor([[1, -1, -8, 7, 3]], dtype=torch.int8)
    assert pack_int4(q).tolist() == [[0xF1, 0x78, 0x03]]  # odd length: zero high nibble


def test_every_value_survives():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)
    assert torch.equal(unpack_int4(pack_int4(q), 16), q)


def test_bad_inputs_are_refused():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="does not fit"):
        unpack_int4(torch.zeros(2, 4, dtype=torch.uint8), 10)


def test_opcheck():
    torch.library.opcheck(pack_int4.default, (values((3, 9)),))
    torch.library.opcheck(unpack_int4.default, (pack_int4(values((2, 3, 8))), 8))


triton_int4 = pytest.importorskip("quarot_fx.kernels.triton_int4")


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (3, 7), (2, 64), (4, 2, 33)])
def test_triton_matches_cpu_bit_for_bit(shape):
    q = values(shape, seed=len(shape))
    packed = triton_int4.triton_pack_int4(q)
    assert torch.equal(packed, pack_int4(q))
    assert torch.equal(triton_int4.triton_unpack_int4(packed, shape[-1]), q)
