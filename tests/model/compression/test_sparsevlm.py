"""SparseVLM (`llava.model.compression.sparsevlm` and its mechanism in `language_model.pruning`):
the budget against the spec's worked example and, over random image sizes, the module's rule restated
exactly; the rater choice, keep rule, distances, recycling and insertion by hand, DPC-kNN against the
official `cluster_and_merge` restated with loops (ties included), rater scores against
eager attention, and through the tiny checkpoint (2 layers: sparse layer 0, stage at layer 1): R = 1
is the vanilla model, a ragged batch equals each row alone, decode after pruning equals re-running
from scratch, the loader runner end to end."""

import math
import random
from fractions import Fraction

import pytest
import torch
from transformers import LlamaConfig, LlamaModel

from llava.model.compression import get_method, parse_method_args, sparsevlm
from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.compression.common import Budget, crop_geometry
from llava.model.language_model import pruning
from llava.model.language_model.pruning import PruningRequest
from llava.tiny import V16_PINPOINTS
from tests.model.compression.test_fastv import _generate, _inputs, assert_full_budget_is_vanilla
from tests.model.language_model.test_pruning import left_padded_prompts


def _budget(ratio=1.0, tokens=None, vanilla=576):
    return Budget(ratio, vanilla, tokens)


# --- budget --------------------------------------------------------------------------------------

def test_merged_count_by_hand():
    # d dropped -> m = int(0.3 d) + 1 recycled -> c = int(m / 10) + 1 centres
    assert [sparsevlm.merged_count(d) for d in (276, 109, 94, 1, 0)] == [9, 4, 3, 1, 0]  # m = 83, 33, 29, 1
    assert sparsevlm.merged_count(torch.tensor([276, 0])).tolist() == [9, 0]
    assert sparsevlm.merged_count(50, recycling=False) == 0


def test_official_triple_at_576_tokens_is_the_spec_example():
    # sparsevlm.md 4: 192 budget: 576 -> 300 + 9 -> 200 + 4 -> 110 + 3, equal tokens 6145 / 32
    schedule = sparsevlm.SparseVLMArgs().schedule(576, _budget(192 / 576), 32)
    assert schedule == ((3, 309), (7, 204), (16, 113))  # stages start after the sparse layers 2, 6, 15
    assert (2 * 576 + 4 * 309 + 9 * 204 + 17 * 113) == 6145


def test_equal_tokens_come_nearest_to_the_target():
    for span, ratio in [(2880, 0.5), (2880, 0.25), (2880, 0.1), (2046, 0.25), (576, 64 / 576)]:
        schedule = sparsevlm.SparseVLMArgs().schedule(span, _budget(ratio, vanilla=span), 32)
        totals = [total for _, total in schedule]
        equal = (2 * span + 4 * totals[0] + 9 * totals[1] + 17 * totals[2]) / 32
        # one step of the first stage moves the equal tokens by about 4 / 32 (more where a centre appears)
        assert abs(equal - ratio * span) <= 0.5, (span, ratio, totals, equal)
        assert span > totals[0] > totals[1] > totals[2]


def test_post_convention_visual_tokens_and_no_stage():
    post = sparsevlm.SparseVLMArgs(convention="post").schedule(2880, _budget(0.1, vanilla=2880), 32)
    assert abs(post[-1][1] - 288) <= 2
    tokens = sparsevlm.SparseVLMArgs().schedule(2880, _budget(tokens=320, vanilla=2880), 32)
    assert abs((2 * 2880 + 4 * tokens[0][1] + 9 * tokens[1][1] + 17 * tokens[2][1]) / 32 - 320) <= 0.5
    assert sparsevlm.SparseVLMArgs().schedule(2880, _budget(1.0, vanilla=2880), 32) == ()
    assert sparsevlm.SparseVLMArgs().schedule(300, _budget(tokens=400), 32) == ()
    assert sparsevlm.SparseVLMArgs(layers="0").schedule(100, _budget(0.5), 2) == ((1, 50),)  # the tiny model
    assert sparsevlm.SparseVLMArgs(layers="1").schedule(100, _budget(0.5), 2) == ((1, 50),)  # moved to layer 0
    assert sparsevlm.SparseVLMArgs().schedule(100, _budget(0.5), 2) == ((1, 50),)  # 2, 6, 15 all moved to 0
    assert sparsevlm.SparseVLMArgs().schedule(100, _budget(0.5), 1) == ()  # no layer after any
    assert [layer for layer, _ in sparsevlm.SparseVLMArgs().schedule(2880, _budget(0.5), 8)] == [3, 7]  # 2; 6, 15 -> 6


def test_unreachable_budget_keeps_nothing_but_the_recycled():
    totals = [total for _, total in sparsevlm.SparseVLMArgs().schedule(2880, _budget(0.01, vanilla=2880), 32)]
    assert totals == [87, 3, 1]  # k = 0: 2880 dropped -> 865 recycled -> 87 centres; 87 -> 27 -> 3; 3 -> 1 -> 1


def _restated_schedule(span, budget, layers, num_layers, convention, recycling):
    """The module docstring's budget rule restated with exact fractions and a loop over every scale at
    which some stage's top-k count steps (k / b for each stage budget b and k = 1 .. span): the scaled
    official triple whose stage totals (recycled included) put the counted tokens nearest to the target,
    of the two scales around it (the largest at most the target, the smallest above it) the lower on a tie."""
    layers = sorted({min(layer, num_layers - 2) for layer in layers if num_layers >= 2})
    target = Fraction(budget.tokens if budget.tokens is not None else budget.ratio * span)
    if not layers or target >= span:
        return ()
    official = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
    nearest = min(official, key=lambda tokens: abs(Fraction(tokens, 576) - target / span))  # dict order on a tie
    base = official[nearest][:len(layers)]

    def merged(dropped):
        return (int(0.3 * dropped) + 1) // 10 + 1 if dropped > 0 and recycling else 0

    def totals_at(steps, stage_budget):  # at the factor steps / stage_budget
        current, totals = span, []
        for budget_here in base:
            kept = max(0, min(steps * budget_here // stage_budget, current - 1))
            current = kept + merged(current - kept)
            totals.append(current)
        return totals

    def counted(totals):
        if convention == "post":
            return totals[-1]
        bounds = layers + [num_layers]
        return Fraction(layers[0] * span + sum((bounds[i + 1] - bounds[i]) * totals[i] for i in range(len(totals))),
                        num_layers)

    below = above = None  # (factor, totals, counted)
    for steps, stage_budget in [(0, 1)] + [(k, b) for b in base for k in range(1, span + 1)]:
        factor, totals = Fraction(steps, stage_budget), totals_at(steps, stage_budget)
        tokens = counted(totals)
        if tokens <= target and (below is None or factor > below[0]):
            below = factor, totals, tokens
        if tokens > target and (above is None or factor < above[0]):
            above = factor, totals, tokens
    if below is None or (above is not None and abs(above[2] - target) < abs(below[2] - target)):
        chosen = above[1]
    else:
        chosen = below[1]
    return tuple((layer + 1, total) for layer, total in zip(layers, chosen))


def test_budget_rule_over_random_image_sizes():
    """Over 200 LLaVA-NeXT image sizes (spans with their newlines), random ratios in (0, 1] and
    `--visual-tokens` budgets, both conventions, recycling on or off and models of 2 to 32 layers:
    the schedule equals the rule restated exactly; counts never grow, stay within the span and >= 0;
    R = 1 schedules nothing."""
    rng = random.Random(4)
    for _ in range(200):
        size = (rng.randint(1, 3000), rng.randint(1, 3000))
        geometry = crop_geometry(size, get_anyres_image_grid_shape(size, V16_PINPOINTS, 336), 24)
        span = geometry.vanilla_image_tokens + geometry.newline_count("raster")
        num_layers = rng.choice([32, 32, 16, 8, 3, 2])
        args = sparsevlm.SparseVLMArgs(layers=rng.choice(["2,6,15", "2,6,15", "1,4", "9"]),
                                       convention=rng.choice(["average", "post"]), recycling=rng.random() < 0.8)
        layers = args.sparse_layers()
        assert args.schedule(span, Budget.resolve(geometry, 1.0), num_layers) == ()
        for budget in (Budget.resolve(geometry, 1.0 - rng.random()),
                       Budget.resolve(geometry, visual_tokens=rng.randint(1, 3000))):
            schedule = args.schedule(span, budget, num_layers)
            assert schedule == _restated_schedule(span, budget, layers, num_layers, args.convention, args.recycling), (
                size, num_layers, args, budget)
            counts = [total for _, total in schedule]
            assert counts == sorted(counts, reverse=True) and all(0 <= total <= span for total in counts)


def test_bad_layers_are_refused():
    for text in ("2,2", "6,2", "a", "1,2,3,4", "-1"):
        with pytest.raises(ValueError, match="layers"):
            parse_method_args("sparsevlm", [f"layers={text}"])


# --- keep rule ---------------------------------------------------------------------------------

def test_top_k_behind_a_total():
    # v = 576, total 309: k = 300 (+9); k = 301 would give 301 + 9 = 310
    found = sparsevlm.top_k_for_totals(torch.tensor([576, 309, 5]), torch.tensor([309, 204, 5]))
    assert found.tolist() == [300, 200, 4]
    # total 5 of 5 tokens: the official min(b, v - 1) keeps 4 and recycles the fifth into one centre


def test_keep_rule_by_hand():
    # image 0: 5 tokens, total 3 -> k = 2 (+1 merged of the 3 dropped): offsets 3 (0.9) and 1 (0.5)
    # image 1: 3 tokens, total 2 -> k = 1: offset 2 (0.7); padding columns score 9, never chosen;
    # ties (image 0, offsets 1 and 4 at 0.5) go to the earlier token
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.5], [0.2, 0.2, 0.7, 9.0, 9.0]])
    kept = sparsevlm.keep(scores, torch.tensor([5, 3]), torch.tensor([3, 2]), sparsevlm.SparseVLMArgs())
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, False]]


# --- recycling ---------------------------------------------------------------------------------

def _official_cluster_and_merge(points, clusters):
    """utils.py `cluster_and_merge` restated with loops for one image, its density noise replaced by
    the module's rule (of equal densities the earlier token is the denser); ties to the earlier index
    (topk / argmin)."""
    count, dim = len(points), len(points[0])
    dist = [[math.dist(points[i], points[j]) / math.sqrt(dim) for j in range(count)] for i in range(count)]
    density = [math.exp(-sum(value ** 2 for value in sorted(dist[i])[:clusters]) / clusters) for i in range(count)]
    dist_max = max(max(row) for row in dist)
    denser = [[density[j] > density[i] or (density[j] == density[i] and j < i) for j in range(count)]
              for i in range(count)]
    to_denser = [min([dist[i][j] for j in range(count) if denser[i][j]] or [dist_max]) for i in range(count)]
    score = [to_denser[i] * density[i] for i in range(count)]
    centres = sorted(range(count), key=lambda i: (-score[i], i))[:clusters]
    assignment = [min(range(clusters), key=lambda c: (dist[centres[c]][i], c)) for i in range(count)]
    for c, centre in enumerate(centres):
        assignment[centre] = c
    merged = []
    for c in range(clusters):
        members = [i for i in range(count) if assignment[i] == c]
        merged.append([sum(points[i][d] for i in members) / (len(members) + 1e-6) for d in range(dim)])
    return merged


def test_cluster_and_merge_by_hand():
    # two tight groups on a line; c = 2: the density peaks are the closest pairs' tokens (0, 1 and 2, 4
    # at distance 0.1); the earlier of a tied pair is denser, so the second of each pair sits 0.1 from a
    # denser token, while the first sits ~10 from any denser one: one centre per group, the groups' means
    tokens = torch.tensor([[[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.2, 0.0], [9.9, 0.0]]])
    merged = sparsevlm.cluster_and_merge(tokens, torch.ones(1, 5, dtype=torch.bool), torch.tensor([2]))
    means = sorted(merged[0, :, 0].tolist())
    assert means == pytest.approx([0.05, (10.0 + 10.2 + 9.9) / 3], rel=1e-5)


def test_pairwise_distances_by_hand():
    # (0, 0), (3, 4), (6, 8) in D = 2: distances 5, 10, 5 over sqrt(2); exactly symmetric, exactly 0 on the diagonal
    points = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]])
    distances = sparsevlm.pairwise_distances(points)
    expected = torch.tensor([[0.0, 5.0, 10.0], [5.0, 0.0, 5.0], [10.0, 5.0, 0.0]]) / math.sqrt(2)
    assert torch.allclose(distances[0], expected, atol=1e-6)
    wide = torch.randn(2, 300, 64, generator=torch.Generator().manual_seed(0)) * 10
    distances = sparsevlm.pairwise_distances(wide)
    assert torch.equal(distances, distances.transpose(1, 2)) and not distances.diagonal(dim1=1, dim2=2).any()
    direct = (wide[:, :, None] - wide[:, None, :]).norm(dim=-1) / 8
    assert torch.allclose(distances, direct, atol=1e-4)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("counts, clusters", [([13, 7, 1, 22], [2, 1, 1, 3]), ([90, 41, 2, 64], [9, 5, 1, 7])])
def test_cluster_and_merge_equals_the_official_function(seed, counts, clusters):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(4, max(counts), 6, generator=generator)
    tokens[0, 5] = tokens[0, 2]  # a duplicate: equal densities, a zero distance
    tokens[3, 6] = tokens[3, 3] = tokens[3, 0]  # three identical tokens
    valid = torch.arange(max(counts)) < torch.tensor(counts)[:, None]
    merged = sparsevlm.cluster_and_merge(tokens, valid, torch.tensor(clusters))
    for image, (count, centres) in enumerate(zip(counts, clusters)):
        official = _official_cluster_and_merge(tokens[image, :count].tolist(), centres)
        assert torch.allclose(merged[image, :centres], torch.tensor(official), atol=1e-5)
        assert not merged[image, centres:].any()


def test_recycle_takes_the_best_dropped_tokens():
    # 12 tokens, 2 kept (offsets 0, 1); 10 dropped -> m = int(3.0) + 1 = 4 recycled (the best-scored
    # dropped: offsets 11, 10, 9, 8) -> c = 1 centre: their mean. The span is row 1's positions 3..14 of a
    # batch of 2 whose state at (row, position) is 100 row + position: offset j holds 103 + j.
    states = (100 * torch.arange(2)[:, None] + torch.arange(15))[..., None].expand(2, 15, 3).float()
    scores = torch.arange(12, dtype=torch.float32)[None]
    kept = torch.zeros(1, 12, dtype=torch.bool)
    kept[0, :2] = True
    merged, valid = sparsevlm.recycle(states, torch.tensor([1]), torch.arange(3, 15)[None], scores, kept,
                                      torch.ones(1, 12, dtype=torch.bool))
    assert valid.tolist() == [[True]]
    assert merged[0, 0].tolist() == pytest.approx([(114 + 113 + 112 + 111) / (4 + 1e-6)] * 3)


def test_shrink_and_insert_by_hand():
    # row 0: positions 0..5, image at 1..3 keeps 2, one merged token goes after it (before text 4, 5);
    # row 1: one left pad, image at 2..3 keeps both, nothing inserted; re-padded left to length 6
    keep = torch.tensor([[True, False, True, False, True, True], [False, True, True, True, True, False]])
    values = torch.tensor([[10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25]], dtype=torch.float32)[..., None]
    extra = torch.tensor([[[99.0]], [[77.0]]])
    valid, destination, out, ends = pruning.shrink_and_insert(keep, torch.tensor([0, 1]), torch.tensor([3, 3]), extra,
                                                              torch.tensor([[True], [False]]), values)
    assert out[..., 0].tolist() == [[10, 12, 99, 14, 15], [0, 21, 22, 23, 24]]
    assert valid.tolist() == [[True] * 5, [False, True, True, True, True]]
    assert destination[0].tolist() == [0, -1, 1, -1, 3, 4]
    assert ends.tolist() == [3, 4]


def test_text_raters_by_hand():
    # one row: image tokens at 1, 2 (embeddings e0 and e1), text at 3, 4, 5. Dot products of the image rows
    # with the text: row e0 -> (1, 0, 0): text 3 gets most; row e1 -> (0, 1, 0)... text 5 (zeros) gets
    # least in both; position 0 (before the image) never rates
    embeds = torch.tensor([[[5.0, 5.0], [4.0, 0.0], [0.0, 4.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    positions, valid = pruning.text_raters(embeds, torch.ones(1, 6, dtype=torch.bool), torch.tensor([0]),
                                           torch.tensor([1]), torch.tensor([2]))
    # softmax over the text of (4, 0, 0) and (0, 4, 0), averaged: text 3 and 4 get (e^4 + 1) / 2 / (e^4 + 2) each,
    # text 5 gets 1 / (e^4 + 2): above the mean 1/3 are 3 and 4
    assert positions[valid].tolist() == [3, 4]


def test_rater_scores_equal_eager_attention():
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50, attn_implementation="eager")
    model = LlamaModel(config).eval()
    embeds = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    # image 0 in row 0 with raters 6, 8; image 1 in row 1 with rater 7 (padded to two)
    raters = (torch.tensor([0, 1]), torch.tensor([[6, 8], [7, 7]]), torch.tensor([[True, True], [True, False]]))
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, output_attentions=True,
                    output_hidden_states=True)
        cos_sin = model.rotary_emb(out.hidden_states[1], position_ids=position_ids)
        scores = pruning.rater_attn(model.layers[1], out.hidden_states[1], cos_sin, mask.bool(), raters)
    heads = out.attentions[1].float().mean(1)  # [B, L, L]
    assert torch.allclose(scores[0], heads[0, [6, 8]].mean(0), atol=1e-5)
    assert torch.allclose(scores[1], heads[1, 7], atol=1e-5)


def test_registered_in_llm():
    method = get_method("sparsevlm")
    assert method.stage == "in-llm" and method.needs == {"rater_attn"}
    assert sparsevlm.SparseVLMArgs().renumber


# --- through the tiny checkpoint (2 decoder layers: sparse layer 0) -----------------------------

def test_full_budget_is_the_vanilla_model(tiny):
    assert_full_budget_is_vanilla(tiny, "sparsevlm", ["layers=0"])


def test_pruning_changes_the_model_and_is_accounted(tiny):
    _, model, _ = tiny
    ids, mask, pixel_values, sizes = _inputs(tiny, [(800, 500)], ["What is shown?"])
    vanilla = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="globalcom2")
    pruned = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=0.25, method="sparsevlm",
                       method_args=["layers=0"])
    record = model.last_accounting[0]
    span = record["in_llm"]["span_tokens"]
    (layer, total), = record["in_llm"]["stages"]
    kept = int(sparsevlm.top_k_for_totals(torch.tensor([span]), torch.tensor([total]))[0])
    assert layer == 1 and total == kept + sparsevlm.merged_count(span - kept)
    assert abs(total - 0.25 * span) <= 1  # 2 layers, sparse layer 0 counted at its output: equal tokens = total
    assert record["layer_image_tokens"] == [span, total]
    # R = 0.25 is nearest to the official 128 of 576 (0.222; 192 is 0.333): that triple, scaled, at layer 0
    assert record["in_llm"]["schedule_params"] == dict(official_tokens=128, official_budgets=[303, 110, 36], layers=[0])
    assert not torch.equal(pruned.logits[0], vanilla.logits[0])
    cache = getattr(pruned, "cache", None) or pruned.past_key_values
    text = ids.shape[1] - 1
    # layer 0 (the sparse layer) cached every token; layer 1 the kept and merged ones (5 decode steps each)
    assert [layer.keys.shape[2] for layer in cache.layers] == [text + span + 5, text + total + 5]


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.25), dict(visual_tokens=100)])
def test_ragged_batch_equals_each_row_alone(tiny, budget):
    _, model, _ = tiny
    sizes, questions = [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky in this picture?"]
    ids, mask, pixel_values, image_sizes = _inputs(tiny, sizes, questions)
    batched = _generate(model, ids, mask, pixel_values, image_sizes, method="sparsevlm", method_args=["layers=0"],
                        **budget)
    spans = [record["in_llm"]["span_tokens"] for record in model.last_accounting]
    assert spans[0] != spans[1]
    for row in range(2):
        alone_ids, alone_mask, _, _ = _inputs(tiny, sizes[row:row + 1], questions[row:row + 1])
        alone = _generate(model, alone_ids, alone_mask, pixel_values[row:row + 1], image_sizes[row:row + 1],
                          method="sparsevlm", method_args=["layers=0"], **budget)
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        for step in range(len(alone.logits)):
            assert torch.allclose(batched.logits[step][row], alone.logits[step][0], atol=1e-4)


def test_decode_after_pruning_equals_running_from_scratch(tiny, monkeypatch):
    """Greedy decode on the pruned cache (per-stage lengths, renumbered positions continued from each
    layer's cache length) against re-running the prompt and the tokens so far without a cache, pruned
    the same way (the raters chosen from the prompt alone, as at the prefill): same tokens and logits."""
    _, model, _ = tiny
    lengths, spans, totals = [30, 24], [20, 15], [9, 5]
    embeds, mask = left_padded_prompts(tiny, lengths)
    args = sparsevlm.SparseVLMArgs(layers="0")

    def request():
        longest = max(lengths)
        starts = [longest - length + 3 for length in lengths]
        return PruningRequest(torch.arange(2), torch.tensor(starts), torch.tensor(spans),
                              [((1, total),) for total in totals], get_method("sparsevlm"), args)

    with torch.no_grad():
        model.get_model().pruning_request = request()
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        prompt = embeds.shape[1]
        choose = pruning.text_raters
        monkeypatch.setattr(pruning, "text_raters", lambda inputs, valid, *rest: choose(inputs[:, :prompt],
                                                                                        valid[:, :prompt], *rest))
        tokens, token_mask = embeds, mask
        for step in range(6):
            model.get_model().pruning_request = request()
            position_ids = (token_mask.cumsum(1) - 1).clamp(min=0)
            logits = model(inputs_embeds=tokens, attention_mask=token_mask, position_ids=position_ids,
                           use_cache=False).logits[:, -1]
            assert torch.allclose(logits, generated.logits[step], atol=1e-4)
            chosen = generated.sequences[:, step]
            assert torch.equal(logits.argmax(-1), chosen)
            tokens = torch.cat([tokens, model.get_model().embed_tokens(chosen)[:, None]], dim=1)
            token_mask = torch.cat([token_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)


def test_loader_runner_end_to_end(loader_answers):
    rows = loader_answers([(80, 50), (50, 90)], "--method", "sparsevlm", "--method-arg", "layers=0", "--retention-ratio", "0.25")
    assert len(rows) == 2
    image = rows[0]["metadata"]["images"][0]
    assert image["method"] == "sparsevlm"
    assert image["in_llm"]["stages"][0][0] == 1
    assert abs(image["post_pruning_image_tokens"] - 0.25 * image["in_llm"]["span_tokens"]) <= 1
