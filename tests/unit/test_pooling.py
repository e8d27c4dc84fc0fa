import pytest
import torch

from ullme_cli.errors import UllmeError
from ullme_cli.models.pooling import LatentAttentionPooling, Pooler, check_pooling, last_token_index

STATES = torch.arange(2 * 5 * 4, dtype=torch.float32).reshape(2, 5, 4)
RIGHT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
LEFT = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_last_token_index_for_both_padding_sides():
    assert last_token_index(RIGHT).tolist() == [2, 4]
    assert last_token_index(LEFT).tolist() == [4, 4]


def test_mean_skips_padding_and_instruction_tokens():
    content = RIGHT.clone()
    content[0, 0] = 0  # first token is instruction
    pooled = Pooler("mean", 4)(STATES, RIGHT, content)
    torch.testing.assert_close(pooled[0], STATES[0, 1:3].mean(0))
    torch.testing.assert_close(pooled[1], STATES[1].mean(0))


def test_weighted_mean_weighs_later_content_tokens_more():
    pooled = Pooler("weighted-mean", 4)(STATES, LEFT, LEFT)
    expected = (STATES[0, 2] * 1 + STATES[0, 3] * 2 + STATES[0, 4] * 3) / 6
    torch.testing.assert_close(pooled[0], expected)


@pytest.mark.parametrize("mask", [RIGHT, LEFT])
def test_last_token_and_cls_pick_real_tokens(mask):
    last = Pooler("last-token", 4)(STATES, mask, mask)
    first = Pooler("cls", 4)(STATES, mask, mask)
    torch.testing.assert_close(last[0], STATES[0, last_token_index(mask)[0]])
    torch.testing.assert_close(first[0], STATES[0, int(mask[0].argmax())])


def test_text_truncated_inside_its_instruction_falls_back_to_all_tokens():
    pooled = Pooler("mean", 4)(STATES, RIGHT, torch.zeros_like(RIGHT))
    torch.testing.assert_close(pooled[0], STATES[0, :3].mean(0))


@pytest.mark.parametrize("form", ["released", "paper"])
def test_latent_attention_is_trainable_and_round_trips(tmp_path, form):
    head = LatentAttentionPooling(hidden_size=16, num_latents=8, num_heads=4, form=form)
    states = torch.randn(2, 5, 16)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(2):  # the released form's zero-initialized output layers pass gradients on after one step
        optimizer.zero_grad()
        head(states, RIGHT).pow(2).sum().backward()
        optimizer.step()
    assert head.latents.grad is not None and head.latents.grad.abs().sum() > 0
    out = head(states, RIGHT).detach()
    head.save(tmp_path)
    again = LatentAttentionPooling.load(tmp_path)
    assert again.form == form
    torch.testing.assert_close(again(states, RIGHT), out)


def test_an_untrained_released_latent_head_is_mean_pooling():
    states = torch.randn(2, 5, 16) * 10
    head = LatentAttentionPooling(hidden_size=16, num_latents=8, num_heads=4)
    torch.testing.assert_close(head(states, RIGHT), Pooler("mean", 16)(states, RIGHT, RIGHT))


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(UllmeError, match="unknown pooling 'max'"):
        check_pooling("max")
