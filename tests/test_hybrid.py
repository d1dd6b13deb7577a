"""response_mask_from_tokens on hand-written cases (the generation path itself is tested on 2 ranks in
test_distributed.py)."""
import torch

from rlhf_ds.hybrid import response_mask_from_tokens

EOS, PAD = 1, 0


def test_mask_covers_tokens_up_to_and_including_first_eos():
    response = torch.tensor([
        [5, 6, 7, 8],        # no EOS: whole row is response
        [EOS, PAD, PAD, PAD],  # EOS first: only the EOS counts
        [5, EOS, 7, EOS],    # tokens after the first EOS do not count, later EOS neither
        [5, 6, 7, EOS],      # EOS last
    ])
    expected = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    mask = response_mask_from_tokens(response, EOS)
    assert mask.dtype == torch.long
    assert torch.equal(mask, expected)


def test_pad_equal_to_eos_as_in_qwen2():
    response = torch.tensor([[4, EOS, EOS, EOS], [4, 4, 4, 4]])
    assert torch.equal(response_mask_from_tokens(response, EOS), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))


def test_several_eos_ids_any_of_them_ends_the_response():
    response = torch.tensor([[4, 9, 4, 4], [4, 4, 1, 4], [4, 4, 4, 4]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert torch.equal(response_mask_from_tokens(response, [1, 9]), expected)


def test_empty_batch_and_empty_response():
    assert response_mask_from_tokens(torch.zeros(0, 3, dtype=torch.long), EOS).shape == (0, 3)
    assert response_mask_from_tokens(torch.zeros(2, 0, dtype=torch.long), EOS).shape == (2, 0)


def test_generator_seed_leaves_the_global_rng_alone():
    from rlhf_ds.hybrid import _seeded

    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    with _seeded(5, torch.device("cpu")):
        first = torch.rand(1)
    assert torch.equal(torch.rand(1), expected_next)
    with _seeded(5, torch.device("cpu")):
        assert torch.equal(torch.rand(1), first)
