"""The dropout-mask generator (spinalkern.rng) is Philox4x32-10: Random123's known answers."""
import torch

from spinalkern.rng import keep_mask, keep_threshold, philox_first_word


def test_philox4x32_10_known_answers():
    # Random123 kat_vectors: philox4x32 10 rounds (counter, key) -> first output word
    assert philox_first_word(0, 0, 0, 0, 0).item() == 0x6627E8D5
    assert philox_first_word(-1, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF,
                             0xFFFFFFFF).item() == 0x408F276D
    seed = 0xA4093822 | (0x299F31D0 << 32)
    assert philox_first_word(seed, 0x243F6A88, 0x85A308D3, 0x13198A2E,
                             0x03707344).item() == 0xD16CFE09


def test_keep_mask_rate_and_independence():
    m = keep_mask(12345, 0, 256, 512, 0.3)
    assert abs(m.float().mean().item() - 0.7) < 0.01
    assert not torch.equal(m, keep_mask(12345, 1, 256, 512, 0.3))   # another stream
    assert not torch.equal(m, keep_mask(12346, 0, 256, 512, 0.3))   # another seed
    assert torch.equal(m, keep_mask(torch.tensor([12345]), 0, 256, 512, 0.3))
    assert keep_mask(7, 0, 4, 4, 0.0).all()
    assert keep_threshold(0.5) == 2 ** 31
