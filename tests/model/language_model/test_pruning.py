"""The in-LLM decoder mechanism (`llava.model.language_model.pruning`): scores against eager
attention, the shrink and masks by hand, decode after a pruned prefill against re-running the
pruned prompt without a cache, and a keep-everything stage against the model's own forward.

The mechanism is driven here by a test keep rule that replays fixed kept sets, so what is checked
is the mechanism, not a method (FastV's rule has its own tests)."""

import types

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaModel

from llava.model.language_model import pruning
from llava.model.language_model.pruning import PruningRequest


def _eager_model(seed=0):
    """3 layers, 4 query heads on 2 KV heads (GQA), eager so attentions can be output."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="eager")
    return LlamaModel(config).eval()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_last_query_attention_equals_eager_attentions(layer):
    model = _eager_model()
    embeds = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :2] = 0  # left padding, ragged rows
    mask[2, :5] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_attentions=True,
                    output_hidden_states=True, use_cache=True)
        layer_input = out.hidden_states[layer]  # hidden_states[i] is layer i's input
        cos_sin = model.rotary_emb(layer_input, position_ids=position_ids)
        scores = pruning.last_query_attn(model.layers[layer], layer_input, cos_sin, mask.bool())
        keys = pruning.cached_keys(out.past_key_values, layer, 9)
        from_cache = pruning.last_query_attn(model.layers[layer], layer_input, cos_sin, mask.bool(), keys=keys)
    reference = out.attentions[layer][:, :, -1, :].float().mean(1)  # [B, L], head mean of the last row
    assert torch.allclose(scores, reference, atol=1e-5)
    assert torch.all(scores[mask == 0] == 0)
    assert keys.shape == (3, 2, 9, 8) and torch.equal(keys, pruning.layer_keys(model.layers[layer], layer_input, cos_sin))
    assert torch.equal(from_cache, scores)


def test_cached_keys_only_when_the_cache_holds_the_whole_prompt():
    cache = DynamicCache()
    assert pruning.cached_keys(None, 0, 4) is None and pruning.cached_keys(cache, 0, 4) is None
    cache.update(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), 0)
    assert pruning.cached_keys(cache, 0, 4) is None  # 3 cached positions cannot serve a 4-token prompt
    assert torch.equal(pruning.cached_keys(cache, 0, 2), cache.layers[0].keys[:, :, 1:])


def test_shrink_by_hand():
    # Row 0 keeps positions 0, 2, 3; row 1 (one left pad) keeps 2 and 3: re-padded left to length 3.
    keep = torch.tensor([[True, False, True, True], [False, False, True, True]])
    values = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    valid, destination, (shrunk,) = pruning.shrink(keep, values)
    assert shrunk.tolist() == [[10, 12, 13], [0, 22, 23]]
    assert valid.tolist() == [[True, True, True], [False, True, True]]
    assert destination.tolist() == [[0, -1, 1, 2], [-1, -1, 1, 2]]


def test_pruned_mask_by_hand():
    valid = torch.tensor([[False, True, True]])
    mask = pruning.pruned_mask(valid, 3)[0, 0]
    # query 0 is padding: sees only itself; query 1 sees key 1; query 2 sees keys 1, 2
    assert mask.tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    assert pruning.pruned_mask(torch.ones(2, 4, dtype=torch.bool), 1) is None  # SDPA's own path
    decode = pruning.pruned_mask(torch.tensor([[False, True, True, True]]), 1)
    assert decode[0, 0].tolist() == [[False, True, True, True]]


def test_keep_positions_and_image_scores():
    scores = torch.arange(12, dtype=torch.float32).view(2, 6)
    rows, starts, counts = torch.tensor([0, 1]), torch.tensor([1, 3]), torch.tensor([3, 2])
    span, positions, inside = pruning.image_scores(scores, rows, starts, counts)
    assert span.tolist() == [[1, 2, 3], [9, 10, 0]] and inside.tolist() == [[True] * 3, [True, True, False]]
    kept = torch.tensor([[True, False, True], [False, True, False]])
    keep = pruning.keep_positions(torch.ones(2, 6, dtype=torch.bool), rows, positions, inside, kept)
    assert keep.tolist() == [[True, True, False, True, True, True], [True, True, True, False, True, True]]


# --- through the tiny checkpoint -------------------------------------------------------------

def _replay_method(kept_offsets):
    """A keep rule that keeps, in image `i`'s span, the offsets `kept_offsets[i]` whatever the scores."""
    def select(scores, image_tokens, targets, args):
        kept = torch.zeros_like(scores, dtype=torch.bool)
        for image, offsets in enumerate(kept_offsets):
            kept[image, offsets] = True
        return kept
    return types.SimpleNamespace(select=select, needs={"last_query_attn"})


def left_padded_prompts(tiny, lengths):
    """Left-padded inputs_embeds and mask for rows of `lengths` random embeddings (shared by the in-LLM
    methods' tests; their image spans start at 3..)."""
    _, model, _ = tiny
    longest = max(lengths)
    generator = torch.Generator().manual_seed(5)
    embeds = torch.zeros(len(lengths), longest, model.config.hidden_size)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        embeds[row, longest - length:] = torch.randn(length, model.config.hidden_size, generator=generator)
        mask[row, longest - length:] = 1
    return embeds, mask


def _request(lengths, spans, offsets, layer):
    longest = max(lengths)
    starts = [longest - length + 3 for length in lengths]
    return PruningRequest(torch.arange(len(lengths)), torch.tensor(starts), torch.tensor(spans),
                          [((layer, len(kept)),) for kept in offsets], _replay_method(offsets), None)


def test_keeping_everything_equals_the_model(tiny):
    """A stage that keeps every token runs the mechanism's own loop, masks and RoPE: same logits."""
    _, model, _ = tiny
    lengths, spans = [30, 24], [20, 15]
    embeds, mask = left_padded_prompts(tiny, lengths)
    with torch.no_grad():
        vanilla = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        model.get_model().pruning_request = _request(lengths, spans, [list(range(20)), list(range(15))], 1)
        pruned = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
    assert torch.allclose(pruned, vanilla, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_the_scoring_layer_reads_its_keys_from_the_cache(tiny, use_cache):
    """Layer K-1's keys are projected once, by the layer itself, when a cache holds them; without a
    cache the scorer projects them again."""
    _, model, _ = tiny
    lengths, spans = [30, 24], [20, 15]
    embeds, mask = left_padded_prompts(tiny, lengths)
    calls = []
    hook = model.get_model().layers[0].self_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            model.get_model().pruning_request = _request(lengths, spans, [[0, 1], [2]], 1)
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=use_cache)
    finally:
        hook.remove()
    assert len(calls) == (1 if use_cache else 2)


def test_ragged_batch_equals_each_row_alone(tiny):
    _, model, _ = tiny
    lengths, spans, offsets = [30, 24], [20, 15], [[0, 4, 7, 19], [1, 2, 3, 5, 8, 13, 14]]
    embeds, mask = left_padded_prompts(tiny, lengths)
    with torch.no_grad():
        model.get_model().pruning_request = _request(lengths, spans, offsets, 1)
        batched = model(inputs_embeds=embeds, attention_mask=mask).logits
        for row, length in enumerate(lengths):
            model.get_model().pruning_request = _request([length], spans[row:row + 1], offsets[row:row + 1], 1)
            alone = model(inputs_embeds=embeds[row:row + 1, -length:]).logits
            assert batched.shape[1] == max(length - spans[index] + len(offsets[index])
                                          for index, length in enumerate(lengths))
            assert torch.allclose(batched[row, -alone.shape[1]:], alone[0], atol=1e-5)


def test_decode_after_pruning_equals_the_pruned_prompt_without_cache(tiny):
    """Greedy decode with the pruned cache against re-running, at every step, the whole prompt and
    the tokens so far without a cache, pruned the same way: same tokens, same logits."""
    _, model, _ = tiny
    lengths, spans, offsets = [30, 24], [20, 15], [[0, 4, 7, 19], [1, 2, 3, 5, 8, 13, 14]]
    embeds, mask = left_padded_prompts(tiny, lengths)
    with torch.no_grad():
        model.get_model().pruning_request = _request(lengths, spans, offsets, 1)
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        tokens = embeds, mask
        reference = []
        for _ in range(6):
            model.get_model().pruning_request = _request(lengths, spans, offsets, 1)
            position_ids = (tokens[1].cumsum(1) - 1).clamp(min=0)
            logits = model(inputs_embeds=tokens[0], attention_mask=tokens[1], position_ids=position_ids,
                           use_cache=False).logits[:, -1]
            reference.append(logits)
            chosen = logits.argmax(-1)
            tokens = (torch.cat([tokens[0], model.get_model().embed_tokens(chosen)[:, None]], 1),
                      torch.cat([tokens[1], torch.ones(len(lengths), 1, dtype=torch.long)], 1))
    assert generated.sequences.tolist() == torch.stack([step.argmax(-1) for step in reference], 1).tolist()
    for step, logits in zip(generated.logits, reference):
        assert torch.allclose(step, logits, atol=1e-4)
    assert model.get_model().pruning_request is None  # a request serves one prefill
    cache = getattr(generated, "cache", None) or generated.past_key_values
    # layer 0 ran on the whole prompt, layer 1 on the pruned one (padded to the longer kept row), each + 5 steps
    assert [layer.keys.shape[2] for layer in cache.layers] == [30 + 5, max(30 - 20 + 4, 24 - 15 + 7) + 5]
