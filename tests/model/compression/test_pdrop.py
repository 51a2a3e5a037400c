"""PDrop (`llava.model.compression.pdrop`): the stage schedule and both budget conventions by hand
(spec `pdrop.md` 2, 6), the budget rule over random image sizes, the keep rule by hand, the official
rank & drop restated with loops on a 6-layer model (three stages, renumbered positions), R = 1 as the
vanilla model, a ragged batch against each row alone, decode after a pruned prefill against the
pruned sequence run from scratch, and the loader runner end to end."""

import copy
import random

import pytest
import torch

from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.compression import get_method, parse_method_args, pdrop
from llava.model.compression.common import Budget, crop_geometry
from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
from llava.model.language_model.pruning import PruningRequest
from llava.tiny import V16_PINPOINTS
from tests.model.compression.test_fastv import _generate, _inputs, assert_full_budget_is_vanilla


def _budget(ratio=1.0, tokens=None, vanilla=2880):
    return Budget(ratio, vanilla, tokens)


def _equivalent(schedule, span, layers):
    """The layer average of the integer counts (what the accounting prints)."""
    per_layer = [span] * layers
    for layer, kept in schedule:
        per_layer[layer:] = [kept] * (layers - layer)
    return sum(per_layer) / layers


# --- the schedule ----------------------------------------------------------------------------------

def test_official_setting_by_hand():
    # every official script: layers [8,16,24], ratios [0.5, 0.25, 0.125] of the ORIGINAL count
    official = ((8, 1440), (16, 720), (24, 360))
    assert pdrop.PDropArgs(convention="post").schedule(2880, _budget(0.125), 32) == official  # lam = 0.125^(1/3)
    assert pdrop.PDropArgs(lam=0.5).schedule(2880, _budget(0.3), 32) == official  # a fixed lam ignores the budget
    # each stage truncated from N0, not from the previous stage: 2001 lam^s with lam = 0.7
    # = 1400.7, 980.49, 686.343 -> 1400, 980, 686
    assert pdrop.PDropArgs(lam=0.7, layers="3,5,9").schedule(2001, _budget(), 32) == ((3, 1400), (5, 980), (9, 686))
    # where a chained truncation differs: 10 lam^s with lam = 0.55 is 5.5, 3.025, 1.66 -> 5, 3, 1, while
    # int(5 * 0.55) = int(2.75) would give 2 at the second stage
    assert pdrop.PDropArgs(lam=0.55).schedule(10, _budget(), 32) == ((8, 5), (16, 3), (24, 1))


def test_average_convention_matches_the_spec_numbers():
    args = pdrop.PDropArgs()
    bounds, lam = args.plan(2880, _budget(0.5), 32)
    assert bounds == [8, 16, 24] and lam == pytest.approx(0.5437, abs=1e-4)  # spec 6: R = 50% at lam ~ 0.5437
    # the official lam = 0.5 gives (1 + 0.5 + 0.25 + 0.125) / 4 = 0.46875: still the official layers
    assert args.plan(2880, _budget(0.46875), 32) == ([8, 16, 24], pytest.approx(0.5))
    # below it the first boundary moves to FastV's K = 2: [2, 12, 22]; (2 + 10 (lam + lam^2 + lam^3)) / 32 = R
    for ratio in (0.4, 0.25, 0.1):
        bounds, lam = args.plan(2880, _budget(ratio), 32)
        assert bounds == [2, 12, 22]
        assert (2 + 10 * (lam + lam ** 2 + lam ** 3)) / 32 == pytest.approx(ratio)
    # below the floor 2/32: nothing left after layer 2, the accounting shows 2/32 reached
    assert args.schedule(2880, _budget(0.05), 32) == ((2, 0), (12, 0), (22, 0))
    # --visual-tokens T is T / N0
    assert args.schedule(2880, _budget(tokens=720), 32) == args.schedule(2880, _budget(0.25), 32)
    assert args.schedule(2880, _budget(1.0), 32) == () == args.schedule(2880, _budget(tokens=5000), 32)


def test_explicit_layers_and_shallow_models():
    args = pdrop.PDropArgs(layers="8,16,24")
    bounds, lam = args.plan(2880, _budget(0.3), 32)  # an explicit list never moves: lam ~ 0.05 on [8,16,24]
    assert bounds == [8, 16, 24] and (8 + 8 * (lam + lam ** 2 + lam ** 3)) / 32 == pytest.approx(0.3)
    # on 2 layers every boundary is layer 1 (at least one layer runs first): one stage, lam^3 of the tokens;
    # (1 + lam^3) / 2 = 0.75 -> lam^3 = 0.5
    assert pdrop.PDropArgs().schedule(1000, _budget(0.75), 2) == ((1, 500),)
    assert pdrop.PDropArgs(layers="8,16,24").schedule(1000, _budget(0.5), 6) == ()  # past the last layer
    for bad in ("0,4", "4,2", "a,b", "3,3"):
        with pytest.raises(ValueError, match="layers must"):
            parse_method_args("pdrop", [f"layers={bad}"])
    with pytest.raises(ValueError, match="lam must"):
        parse_method_args("pdrop", ["lam=1.5"])


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_budget_rule_over_random_image_sizes(ratio):
    """Over 200 image sizes: spans of LLaVA-NeXT (newlines included), counts never growing, the
    layer average within the budget and short of it by less than one token per stage; the post
    convention ending at int(R N0)."""
    generator = random.Random(13)
    average, post = pdrop.PDropArgs(), pdrop.PDropArgs(convention="post")
    for _ in range(200):
        size = (generator.randint(20, 3000), generator.randint(20, 3000))
        grid = get_anyres_image_grid_shape(size, V16_PINPOINTS, 336)
        span = crop_geometry(size, grid, 24, True).vanilla_image_tokens
        schedule = average.schedule(span, _budget(ratio, vanilla=span), 32)
        counts = [kept for _, kept in schedule]
        assert [layer for layer, _ in schedule] in ([8, 16, 24], [2, 12, 22])
        assert counts == sorted(counts, reverse=True) and all(0 <= kept < span for kept in counts)
        reached = _equivalent(schedule, span, 32)
        assert ratio * span - len(schedule) <= reached <= ratio * span + 1e-6
        final = post.schedule(span, _budget(ratio, vanilla=span), 32)
        assert [layer for layer, _ in final] == [8, 16, 24] and final[-1][1] == int(ratio * span)


def test_keep_rule_by_hand():
    # image 0: 5 tokens, keep 2 -> offsets 3 (0.9) and 1 (0.5); image 1: 3 tokens with a tie at 0.7 for one
    # place -> the earlier, offset 1; its padding columns score 9 and are never chosen
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.0], [0.2, 0.7, 0.7, 9.0, 9.0]])
    kept = pdrop.keep(scores, torch.tensor([5, 3]), torch.tensor([2, 1]), pdrop.PDropArgs())
    assert kept.tolist() == [[False, True, False, True, False], [False, True, False, False, False]]


def test_registered_in_llm():
    method = get_method("pdrop")
    assert method.stage == "in-llm" and method.needs == {"next_layer_query_attn"}
    assert pdrop.PDropArgs().renumber  # the official compaction of positions


# --- a 6-layer model (three stages) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def deep(tiny):
    """The tiny checkpoint's language model configuration with 6 layers, random weights, no tower."""
    _, model, _ = tiny
    config = copy.deepcopy(model.config)
    config.num_hidden_layers, config.mm_vision_tower = 6, None
    torch.manual_seed(0)
    return LlavaLlamaForCausalLM(config).eval()


ARGS = pdrop.PDropArgs(layers="2,3,5", lam=0.6)  # stages of 1, 2 and 1 layers after 2 full ones


def _prompt(model, lengths, seed=5):
    """Left-padded random embeddings `[B, L, D]` and mask for rows of `lengths`."""
    longest = max(lengths)
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.zeros(len(lengths), longest, model.config.hidden_size)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long)
    for row, length in enumerate(lengths):
        embeds[row, longest - length:] = torch.randn(length, model.config.hidden_size, generator=generator)
        mask[row, longest - length:] = 1
    return embeds, mask


def _request(lengths, spans, args=ARGS, method=None, start=3):
    longest = max(lengths)
    schedules = [args.schedule(span, _budget(), 6) for span in spans]
    return PruningRequest(torch.arange(len(lengths)), torch.tensor([longest - length + start for length in lengths]),
                          torch.tensor(spans), schedules, method or get_method("pdrop"), args)


def _official_pipeline(model, embeds, start, span, bounds, lam):
    """pdrop_rank_drop and pdrop_forward restated for one row without padding (spec 3-4): after layer
    b - 1, layer b's norm and q/k (RoPE at the current positions) score the last token's row, fp32
    softmax, head mean; the image columns' top int(N0 lam^s) (ties to the earlier) kept in order;
    positions renumbered 0.. . Returns the last position's logits."""
    backbone = model.get_model()
    hidden, image_start, current = embeds[0], start, span
    for index, layer in enumerate(backbone.layers):
        positions = torch.arange(hidden.shape[0])[None]
        cos, sin = backbone.rotary_emb(hidden[None], positions)
        if index in bounds:
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden[None])
            heads, kv_heads, head_dim = (model.config.num_attention_heads, model.config.num_key_value_heads,
                                         attention.head_dim)
            query = attention.q_proj(normed).view(1, -1, heads, head_dim).transpose(1, 2)
            key = attention.k_proj(normed).view(1, -1, kv_heads, head_dim).transpose(1, 2)
            query = query * cos[:, None] + _rotate_half(query) * sin[:, None]
            key = key * cos[:, None] + _rotate_half(key) * sin[:, None]
            key = key.repeat_interleave(heads // kv_heads, dim=1)
            row = torch.stack([query[0, h, -1] @ key[0, h].T for h in range(heads)]) / head_dim ** 0.5
            scores = row.float().softmax(-1).mean(0)[image_start:image_start + current].tolist()
            kept_count = int(span * lam ** (bounds.index(index) + 1))
            top = sorted(sorted(range(current), key=lambda offset: (-scores[offset], offset))[:kept_count])
            hidden = torch.cat([hidden[:image_start], hidden[[image_start + offset for offset in top]],
                                hidden[image_start + current:]])
            current = kept_count
            positions = torch.arange(hidden.shape[0])[None]
            cos, sin = backbone.rotary_emb(hidden[None], positions)
        hidden = layer(hidden[None], attention_mask=None, position_embeddings=(cos, sin), position_ids=positions)[0]
    return model.lm_head(backbone.norm(hidden))[-1]


def _rotate_half(tensor):
    first, second = tensor.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


@pytest.mark.parametrize("seed", range(3))
def test_three_stages_equal_the_official_pipeline_restated(deep, seed):
    embeds, _ = _prompt(deep, [40], seed)
    with torch.no_grad():
        deep.get_model().pruning_request = _request([40], [30])
        ours = deep(inputs_embeds=embeds).logits[0, -1]
        official = _official_pipeline(deep, embeds, 3, 30, [2, 3, 5], 0.6)
    assert torch.allclose(ours, official, atol=1e-5)
    assert not torch.allclose(ours, _official_pipeline(deep, embeds, 3, 30, [2, 3, 5], 1.0), atol=1e-5)


def test_ragged_batch_equals_each_row_alone_through_three_stages(deep):
    lengths, spans = [40, 31], [30, 17]
    embeds, mask = _prompt(deep, lengths)
    with torch.no_grad():
        deep.get_model().pruning_request = _request(lengths, spans)
        batched = deep(inputs_embeds=embeds, attention_mask=mask).logits[:, -1]
        for row, length in enumerate(lengths):
            deep.get_model().pruning_request = _request([length], spans[row:row + 1])
            alone = deep(inputs_embeds=embeds[row:row + 1, -length:]).logits[0, -1]
            assert torch.allclose(batched[row], alone, atol=1e-5)


def test_stages_after_an_image_is_pruned_to_nothing_leave_the_state_alone(deep):
    """A low target on a shallow model solves lambda = 0: the first stage drops the whole image and
    the later stages meet an empty span (once an IndexError). The text still runs to the end."""
    assert pdrop.PDropArgs().schedule(2928, _budget(0.1), 4) == ((1, 0), (2, 0), (3, 0))
    lengths, spans = [40], [30]
    embeds, _ = _prompt(deep, lengths)
    args = pdrop.PDropArgs(layers="2,3,5", lam=0.01)  # int(30 * 0.01**s) = 0 at every stage
    with torch.no_grad():
        deep.get_model().pruning_request = _request(lengths, spans, args=args)
        pruned = deep(inputs_embeds=embeds).logits[0, -1]
        text_only = torch.cat([embeds[:, :3], embeds[:, 33:]], dim=1)  # the image (positions 3..32) removed at 2
    assert torch.isfinite(pruned).all() and pruned.shape == (deep.config.vocab_size,)
    assert not torch.allclose(pruned, deep(inputs_embeds=text_only).logits[0, -1], atol=1e-5)  # layers < 2 saw it


def test_decode_after_pruning_equals_the_pruned_sequence_from_scratch(deep):
    """Greedy decode with the per-stage caches and shifted positions against re-running, at each
    step, the prompt and the tokens so far without a cache, pruned to the same kept sets (replayed:
    a from-scratch run would rank with the newest token as query) and renumbered the same way."""
    lengths, spans = [40, 31], [30, 17]
    embeds, mask = _prompt(deep, lengths)
    chosen = []

    def recording(scores, image_tokens, targets, args):
        kept = pdrop.keep(scores, image_tokens, targets, args)
        chosen.append(kept)
        return kept

    def replaying():
        stages = iter(chosen)
        return type("Replay", (), dict(needs={"next_layer_query_attn"},
                                       select=staticmethod(lambda scores, image_tokens, targets, args: next(stages))))

    with torch.no_grad():
        deep.get_model().pruning_request = _request(lengths, spans, method=type(
            "Record", (), dict(needs={"next_layer_query_attn"}, select=staticmethod(recording))))
        generated = deep.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
        assert len(chosen) == 3
        tokens, reference = (embeds, mask), []
        for _ in range(5):
            deep.get_model().pruning_request = _request(lengths, spans, method=replaying())
            logits = deep(inputs_embeds=tokens[0], attention_mask=tokens[1], use_cache=False,
                          position_ids=(tokens[1].cumsum(1) - 1).clamp(min=0)).logits[:, -1]
            reference.append(logits)
            step = logits.argmax(-1)
            tokens = (torch.cat([tokens[0], deep.get_model().embed_tokens(step)[:, None]], 1),
                      torch.cat([tokens[1], torch.ones(len(lengths), 1, dtype=torch.long)], 1))
    assert generated.sequences.tolist() == torch.stack([step.argmax(-1) for step in reference], 1).tolist()
    for step, logits in zip(generated.logits, reference):
        assert torch.allclose(step, logits, atol=1e-4)
    cache = getattr(generated, "cache", None) or generated.past_key_values
    kept = [[span] + [count for _, count in ARGS.schedule(span, _budget(), 6)] for span in spans]  # per stage
    text = [length - span for length, span in zip(lengths, spans)]
    stage_of_layer = [0, 0, 1, 2, 2, 3]
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        max(text[row] + kept[row][stage] for row in range(2)) + 4 for stage in stage_of_layer]  # 5 tokens, 4 run


def test_decode_without_the_position_shift_differs(deep):
    """The shift matters: the same prefill with renumber=false (original ids, FastV's convention)
    gives other logits, so the decode test above can fail."""
    embeds, mask = _prompt(deep, [40])
    with torch.no_grad():
        deep.get_model().pruning_request = _request([40], [30])
        renumbered = deep(inputs_embeds=embeds).logits[0, -1]
        deep.get_model().pruning_request = _request([40], [30], pdrop.PDropArgs(layers="2,3,5", lam=0.6,
                                                                               renumber=False))
        original = deep(inputs_embeds=embeds).logits[0, -1]
    assert not torch.allclose(renumbered, original, atol=1e-5)


# --- through the tiny checkpoint (2 decoder layers: one stage at layer 1) ---------------------------

def test_full_budget_is_the_vanilla_model(tiny):
    assert_full_budget_is_vanilla(tiny, "pdrop")


def test_pruning_is_accounted_with_both_counts(tiny):
    _, model, _ = tiny
    ids, mask, pixel_values, sizes = _inputs(tiny, [(800, 500)], ["What is shown?"])
    pruned = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=0.75, method="pdrop")
    record = model.last_accounting[0]
    span = record["in_llm"]["span_tokens"]
    kept = int(span * 0.5)  # 2 layers: (1 + lam^3) / 2 = 0.75, one stage at layer 1 keeping N0 lam^3 = N0 / 2
    assert abs(int(span * (0.5 ** (1 / 3)) ** 3) - kept) <= 1
    stage = record["in_llm"]["stages"]
    assert len(stage) == 1 and stage[0][0] == 1 and abs(stage[0][1] - kept) <= 1
    assert record["post_pruning_image_tokens"] == stage[0][1]
    assert record["equivalent_image_tokens"] == (span + stage[0][1]) / 2
    # the solved lam is recorded: (1 + lam^3) / 2 = 0.75 with all three boundaries clamped into layer 1 of 2
    params = record["in_llm"]["schedule_params"]
    assert params["layers"] == [1, 1, 1] and params["lam"] == pytest.approx(0.5 ** (1 / 3))
    cache = getattr(pruned, "cache", None) or pruned.past_key_values
    text = ids.shape[1] - 1
    assert [layer.keys.shape[2] for layer in cache.layers] == [text + span + 5, text + stage[0][1] + 5]


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.75), dict(visual_tokens=700)])
def test_ragged_batch_equals_each_row_alone(tiny, budget):
    """Two images of different spans and questions of different lengths, left-padded: every row's
    greedy tokens equal its run alone."""
    _, model, _ = tiny
    sizes, questions = [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky in this picture?"]
    ids, mask, pixel_values, image_sizes = _inputs(tiny, sizes, questions)
    batched = _generate(model, ids, mask, pixel_values, image_sizes, method="pdrop", **budget)
    spans = [record["in_llm"]["span_tokens"] for record in model.last_accounting]
    assert spans[0] != spans[1]
    for row in range(2):
        alone_ids, alone_mask, _, _ = _inputs(tiny, sizes[row:row + 1], questions[row:row + 1])
        alone = _generate(model, alone_ids, alone_mask, pixel_values[row:row + 1], image_sizes[row:row + 1],
                          method="pdrop", **budget)
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        assert torch.allclose(batched.logits[0][row], alone.logits[0][0], atol=1e-4)


def test_loader_runner_end_to_end(loader_answers):
    rows = loader_answers([(80, 50), (50, 90)], "--method", "pdrop", "--method-arg", "convention=post", "--retention-ratio", "0.25")
    assert len(rows) == 2
    image = rows[0]["metadata"]["images"][0]
    assert image["method"] == "pdrop" and image["method_args"]["convention"] == "post"
    assert image["post_pruning_image_tokens"] == int(0.25 * image["in_llm"]["span_tokens"])
