"""Tokenizer ids (against open_clip's own tokenizer), the two rules beyond the reference, and MLM masking."""
from open_clip.tokenizer import SimpleTokenizer
import pytest
import torch

from methods.irra.masking import mask_tokens
from utils import tokenizer as T
from utils.errors import UserError

CAPTIONS = [
    "A man wearing a black jacket, blue jeans and white shoes.",
    "The woman has long brown hair; she carries a red backpack & walks fast!",
    "A young girl in a pink T-shirt (with a logo) and grey shorts, 2 bags.",
]


@pytest.fixture(scope="module")
def reference():
    return SimpleTokenizer()


def test_vocabulary_agrees_with_open_clip_below_mask(reference):
    ours = T.vocab().decoder
    assert len(ours) == T.VOCAB_SIZE == 49408
    mismatched = [i for i in range(T.MASK_ID) if ours[i] != reference.decoder[i]]
    assert mismatched == []
    assert ours[T.MASK_ID:] == ["<|mask|>", "<|startoftext|>", "<|endoftext|>"]
    # open_clip keeps the merge we drop in slot 49405; it is that merge, and our ranks do not hold it.
    assert reference.decoder[T.MASK_ID] == "".join(T.vocab().dropped_merge) == "jekyll</w>"
    assert T.vocab().dropped_merge not in T.vocab().ranks


def test_ids_equal_open_clip_for_ordinary_captions(reference):
    ids = T.tokenize(CAPTIONS)
    for row, caption in zip(ids, CAPTIONS):
        expected = [T.SOT_ID] + reference.encode(caption) + [T.EOT_ID]
        assert row[:len(expected)].tolist() == expected
        assert row[len(expected):].eq(0).all()


def test_hand_checked_ids():
    # 'a</w>' = 320, 'man</w>' = 786, ','+'</w>' = 267 in CLIP's vocabulary.
    assert T.tokenize("A  man,", context_length=6).tolist() == [[49406, 320, 786, 267, 49407, 0]]
    assert T.encode("A &amp; B") == T.encode("a & b")


def test_dropped_merge_falls_back_to_its_two_pieces(reference):
    assert reference.encode("jekyll") == [49405]  # the reference's id: our <|mask|> slot
    enc = T.vocab().encoder
    first, second = T.vocab().dropped_merge
    assert T.encode("jekyll") == [enc[first], enc[second]] == [43893, 865]
    assert T.decode(T.tokenize("dr jekyll")[0]) == "dr jekyll"


@pytest.mark.parametrize("special", ["<|startoftext|>", "<|endoftext|>", "<|mask|>"])
def test_special_strings_in_text_are_plain_text(special):
    row = T.tokenize(f"a man {special} in red")[0]
    n = int((row != 0).sum())
    assert row[0] == T.SOT_ID and row[n - 1] == T.EOT_ID
    inner = row[1:n - 1]
    assert not any(i >= T.MASK_ID for i in inner.tolist())
    assert inner.tolist()[-2:] == T.encode("in red")  # the caption did not end early
    assert special.strip("<|>") in T.decode(row)


def test_padding_and_single_string_shape():
    out = T.tokenize("a man", context_length=10)
    assert out.shape == (1, 10) and out.dtype == torch.long
    assert out[0].tolist() == [49406, 320, 786, 49407, 0, 0, 0, 0, 0, 0]
    assert T.tokenize(["a", "b", "c"]).shape == (3, 77)


def test_truncation_keeps_context_and_ends_with_eot():
    caption = " ".join(["red"] * 100)
    row = T.tokenize(caption, context_length=12)[0]
    red = T.encode("red")[0]
    assert row.tolist() == [T.SOT_ID] + [red] * 10 + [T.EOT_ID]


def test_truncate_false_names_the_caption():
    caption = "a very long description of a person " * 20
    with pytest.raises(UserError, match="a very long description of a person") as info:
        T.tokenize(caption, context_length=16, truncate=False)
    assert "context length 16" in str(info.value)
    assert len(str(info.value)) < 200  # the caption is shortened in the message


def test_decode_round_trip_and_mask():
    assert T.decode(T.tokenize("A man, wearing a red T-shirt!")[0]) == "a man , wearing a red t - shirt !"
    assert T.decode(torch.tensor([T.SOT_ID, 320, T.MASK_ID, 786, T.EOT_ID, 320, 0])) == "a <|mask|> man"
    assert T.decode([320, 786, 0, 0]) == "a man"  # no EOT: trailing zeros are padding


def test_mask_tokens_rules():
    ids = torch.tensor([T.SOT_ID, 320, 786, 0, 267, T.EOT_ID, 0, 0])
    masked, labels = mask_tokens(ids, mask_rate=1.0, replace_mask=1.0, replace_random=0.0)
    # id 0 (padding, and the '!' token) and SOT/EOT are never chosen.
    assert masked.tolist() == [T.SOT_ID, T.MASK_ID, T.MASK_ID, 0, T.MASK_ID, T.EOT_ID, 0, 0]
    assert labels.tolist() == [0, 320, 786, 0, 267, 0, 0, 0]
    masked, labels = mask_tokens(ids, mask_rate=1.0, replace_mask=0.0, replace_random=0.0)
    assert masked.tolist() == ids.tolist() and labels.tolist() == [0, 320, 786, 0, 267, 0, 0, 0]
    masked, _ = mask_tokens(ids, mask_rate=1.0, replace_mask=0.0, replace_random=1.0,
                              generator=torch.Generator().manual_seed(0))
    chosen = torch.tensor([1, 2, 4])
    assert ((masked[chosen] >= 1) & (masked[chosen] < T.MASK_ID)).all()
    assert masked[[0, 3, 5, 6, 7]].tolist() == [T.SOT_ID, 0, T.EOT_ID, 0, 0]


def test_mask_tokens_masks_position_one_when_nothing_chosen():
    ids = torch.tensor([T.SOT_ID, 320, 786, T.EOT_ID, 0])
    masked, labels = mask_tokens(ids, mask_rate=0.0)
    assert masked.tolist() == [T.SOT_ID, T.MASK_ID, 786, T.EOT_ID, 0]
    assert labels.tolist() == [0, 320, 0, 0, 0]


def test_mask_tokens_statistics_and_determinism():
    g = torch.Generator().manual_seed(123)
    ids = torch.cat([torch.tensor([T.SOT_ID]), torch.arange(1000, 1075), torch.tensor([T.EOT_ID])])
    chosen = masked = random = kept = 0
    for _ in range(2000):
        m, lab = mask_tokens(ids, generator=g)
        sel = lab != 0
        assert lab[sel].equal(ids[sel]) and m[~sel].equal(ids[~sel])
        chosen += int(sel.sum())
        masked += int((m[sel] == T.MASK_ID).sum())
        kept += int((m[sel] == ids[sel]).sum())
        random += int(((m[sel] != T.MASK_ID) & (m[sel] != ids[sel])).sum())
    total = 2000 * 75
    assert abs(chosen / total - 0.15) < 0.005
    assert abs(masked / chosen - 0.8) < 0.01
    assert abs(random / chosen - 0.1) < 0.01
    assert abs(kept / chosen - 0.1) < 0.01
    a = mask_tokens(ids, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, generator=torch.Generator().manual_seed(5))
    assert a[0].equal(b[0]) and a[1].equal(b[1])
