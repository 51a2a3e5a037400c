"""DART (`llava.model.compression.dart`): the budget by hand and over random image sizes (spec
`dart.md` 4), the keep rule by hand (pivots, the set's visiting order, the claims) and against the
official selection restated with loops and sets, the scorer against the model's own cache and
hidden states, and through the tiny checkpoint (2 layers, so K = 1): R = 1 is the vanilla model, a
ragged batch equals each row alone, decode after pruning equals the pruned prompt re-run from
scratch, the accounting, and the loader runner end to end."""

import random
import types

import pytest
import torch

from llava.mm_utils import get_anyres_image_grid_shape
from llava.model.compression import dart, get_method, parse_method_args
from llava.model.compression.common import Budget, crop_geometry
from llava.model.language_model import pruning
from llava.model.language_model.pruning import PruningRequest
from llava.tiny import V16_PINPOINTS

from tests.model.compression.test_fastv import _generate, _inputs, assert_full_budget_is_vanilla
from tests.model.language_model.test_pruning import left_padded_prompts


def _budget(ratio=1.0, tokens=None, vanilla=2880):
    return Budget(ratio, vanilla, tokens)


def test_budget_by_hand():
    args = dart.DARTArgs()
    # topk = min(b, N - 4) // 8, kept = 4 + 8 topk (spec 4: "budget 128 keeps 132 and budget 320 keeps 324")
    assert args.schedule(576, _budget(tokens=128, vanilla=576), 32) == ((2, 132),)
    assert args.schedule(2880, _budget(tokens=320), 32) == ((2, 324),)
    assert args.schedule(2880, _budget(0.25), 32) == ((2, 724),)  # b = 720, topk 90
    assert args.schedule(2880, _budget(0.1), 32) == ((2, 292),)   # b = 288, topk 36
    assert args.schedule(10, _budget(0.5), 32) == ((2, 4),)       # b = 5 < 8: topk 0, the image pivots alone
    assert args.schedule(4, _budget(0.5), 32) == ()               # 4 pivots are the whole span
    assert args.schedule(2880, _budget(1.0), 32) == ()            # a full budget: vanilla, not 4 + 8 * 359
    assert args.schedule(100, _budget(tokens=5000), 32) == ()
    assert args.schedule(15, _budget(tokens=14, vanilla=15), 32) == ((2, 12),)  # the pool holds 11: min(14, 11) // 8
    assert dart.DARTArgs(k=40).schedule(2880, _budget(0.25), 32) == ()
    assert dart.DARTArgs(pivot_image=2, pivot_text=2).schedule(100, _budget(0.5, vanilla=100), 32) == ((2, 50),)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="k must be at least 1"):
        parse_method_args("dart", ["k=0"])
    with pytest.raises(ValueError, match="pivot_image must be at least 1"):
        parse_method_args("dart", ["pivot_image=0"])


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
def test_budget_over_random_image_sizes(ratio):
    rng = random.Random(0)
    args = dart.DARTArgs()
    for _ in range(200):
        size = (rng.randint(1, 3000), rng.randint(1, 3000))
        geometry = crop_geometry(size, get_anyres_image_grid_shape(size, V16_PINPOINTS, 336), 24)
        span = geometry.vanilla_image_tokens
        stages = args.schedule(span, _budget(ratio, vanilla=span), 32)
        topk = min(round(ratio * span), span - 4) // 8
        assert stages == ((2, 4 + 8 * topk),)
        assert 4 + 8 * topk <= max(4, round(ratio * span)) + 4  # never more than b + 4 (the image pivots)


# --- the keep rule by hand -------------------------------------------------------------------

def _features(norms, positions, states):
    return torch.cat([torch.tensor(norms, dtype=torch.float32)[..., None],
                      torch.tensor(positions, dtype=torch.float32)[..., None],
                      torch.tensor(states, dtype=torch.float32)], dim=-1)


def test_pivot_order_is_the_official_sets():
    # CPython puts small ints in an 8-slot table by value mod 8: 18 (slot 2) comes before 13 (slot 5),
    # so the text pivot at 18 is visited before the image pivot at 13.
    assert dart.pivot_order([13], [18]) == [18, 13]
    assert dart.pivot_order([9], [18]) == [9, 18]  # slots 1 and 2


def test_keep_rule_by_hand():
    """One pivot of each kind, each claiming topk = 1 (target 1 + 2 * 1 = 3).

    Image 0: 8 image columns at positions 10..17, then text columns 8..10 at 18..20, then 2 columns
    past its row's end (zeros). The image pivot is column 3 (norm 5), the text pivot column 8 (norm 6).
    The text pivot (1, 0) goes first (position 18 before 13, test above) and claims column 0 (-1, -1),
    the least similar to it (cos -0.707; column 1 has -0.555); then the image pivot (0, 1) finds column 0
    gone and claims column 2 (cos -0.555). Kept: 0, 2, 3. In the other order column 1 would be kept.
    Image 1: 4 image columns, target = span: kept whole."""
    image_states = [[-1, -1], [-1, 1.5], [1.5, -1], [0, 1], [1, 1], [1, 0.2], [0.2, 1], [1, 1.2]]
    row0 = _features([1, 1, 1, 5, 1, 1, 1, 1, 6, 2, 3, 0, 0], list(range(10, 21)) + [0, 0],
                     image_states + [[1, 0], [0.3, 0.3], [0.5, 0.1], [0, 0], [0, 0]])
    row1 = _features([2, 1, 3, 1, 4, 4, 4, 4, 4, 0, 0, 0, 0], list(range(5, 14)) + [0] * 4, [[1, 0]] * 13)
    features = torch.stack([row0, row1])
    args = dart.DARTArgs(pivot_image=1, pivot_text=1)
    kept = dart.keep(features, torch.tensor([8, 4]), torch.tensor([3, 4]), args)
    assert kept[0].nonzero().flatten().tolist() == [0, 2, 3]
    assert kept[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    # target 1: the image pivot alone (topk 0)
    alone = dart.keep(features, torch.tensor([8, 4]), torch.tensor([1, 1]), args)
    assert alone[0].nonzero().flatten().tolist() == [3] and alone[1].nonzero().flatten().tolist() == [2]


def _official_keep(norms, states, start, length, budget, pivot_image=4, pivot_text=4):
    """spec 2 restated as the official `get_retained_image_token` does it, one row without padding
    (positions are indices): key-norm pivots (ties to the earlier index, where topk's order is
    unspecified), the pivots visited in the order of a copied Python set, each claiming from a set of
    candidates the `topk` of lowest cosine (ties to the earlier candidate of the set's list)."""
    topk = min(budget, length - pivot_image) // (pivot_image + pivot_text)
    image_norms = norms[start:start + length].tolist()
    text_norms = norms[start + length:].tolist()
    image_indices = [start + i for i in sorted(range(length), key=lambda i: (-image_norms[i], i))[:pivot_image]]
    query_indices = [start + length + i
                     for i in sorted(range(len(text_norms)), key=lambda i: (-text_norms[i], i))[:pivot_text]]
    indices_set = set(image_indices + query_indices)
    tmp_set = indices_set.copy()
    valid_indices = set(range(start, start + length))
    valid_indices.difference_update(image_indices)
    for item in list(tmp_set):
        valid_list = list(valid_indices)
        cos = torch.nn.functional.cosine_similarity(states[item][None], states[valid_list], dim=-1).tolist()
        chosen = [valid_list[i] for i in sorted(range(len(valid_list)), key=lambda i: (cos[i], i))[:topk]]
        indices_set.update(chosen)
        valid_indices.difference_update(chosen)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("seed", range(6))
def test_keep_rule_equals_the_official_selection(seed):
    """Random rows (coarse norms: ties; duplicated states: cosine ties), one image each at a random
    start, through `keep` batched against the official selection restated per row."""
    generator = torch.Generator().manual_seed(seed)
    total, starts, lengths, budgets = 60, [3, 7, 12], [40, 30, 44], [19, 10, 33]
    rows = []
    for start, length, budget in zip(starts, lengths, budgets):
        norms = torch.randint(1, 6, (total,), generator=generator).float()
        states = torch.randn(total, 6, generator=generator)
        states[start + 5] = states[start + 9]  # exact duplicates tie in cosine
        states[start + 11] = states[start + 2]
        rows.append((norms, states, start, length, budget))
    width = max(total - start for start in starts)
    features = torch.zeros(len(rows), width, 2 + 6)
    targets = []
    for image, (norms, states, start, length, budget) in enumerate(rows):
        count = total - start
        features[image, :count] = torch.cat([norms[start:, None], torch.arange(start, total)[:, None].float(),
                                             states[start:]], dim=-1)
        targets.append(4 + 8 * (min(budget, length - 4) // 8))
    kept = dart.keep(features, torch.tensor(lengths), torch.tensor(targets), dart.DARTArgs())
    for image, (norms, states, start, length, budget) in enumerate(rows):
        ours = [start + int(column) for column in kept[image].nonzero().flatten()]
        assert ours == _official_keep(norms, states, start, length, budget)
        assert len(ours) == targets[image]


def test_registered_in_llm():
    method = get_method("dart")
    assert method.stage == "in-llm" and method.needs == {"dart_pivot_features"}
    assert method.signals_for(dart.DARTArgs(), False) == frozenset()


# --- the scorer and the mechanism ---------------------------------------------------------------

def test_scorer_equals_the_models_cache_and_hidden_states(tiny):
    """Column 0: the L1 norm of layer 0's keys as the model caches them (RoPE'd); columns 2..: layer 0's
    output through the final norm; column 1: positions from each row's first real token."""
    _, model, _ = tiny
    backbone = model.get_model()
    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(2, 9, model.config.hidden_size, generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        out = backbone(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=True,
                       output_hidden_states=True)
        cos_sin = backbone.rotary_emb(embeds, position_ids=position_ids)
        features = pruning.dart_pivot_features(backbone, backbone.layers[0], embeds, out.hidden_states[1], cos_sin,
                                               mask.bool())
    cache = getattr(out, "cache", None) or out.past_key_values
    assert torch.allclose(features[..., 0], cache.layers[0].keys.float().abs().sum((1, 3)), atol=1e-4)
    assert torch.allclose(features[..., 2:], backbone.norm(out.hidden_states[1]).float(), atol=1e-5)
    assert features[1, 3:, 1].tolist() == list(range(6)) and features[0, :, 1].tolist() == list(range(9))


def test_through_end_spans_by_hand():
    scores = torch.arange(24, dtype=torch.float32).view(2, 6, 2)  # features of width 2
    rows, starts, counts = torch.tensor([0, 1]), torch.tensor([1, 3]), torch.tensor([2, 2])
    span, positions, inside = pruning.image_scores(scores, rows, starts, counts, through_end=True)
    # image 0: positions 1..5 (2 image, 3 text); image 1: 3..5 (2 image, 1 text), then past its row's end
    assert positions.tolist() == [[1, 2, 3, 4, 5], [3, 4, 5, 5, 5]]
    assert inside.tolist() == [[True, True, False, False, False], [True, True, False, False, False]]
    assert span[1, :, 0].tolist() == [18, 20, 22, 0, 0] and span[0, :, 1].tolist() == [3, 5, 7, 9, 11]


def _request(lengths, spans, kept, method, args):
    """Image spans at 3.. of each left-padded row; schedule `(K=1, kept)`."""
    longest = max(lengths)
    starts = [longest - length + 3 for length in lengths]
    return PruningRequest(torch.arange(len(lengths)), torch.tensor(starts), torch.tensor(spans),
                          [((1, count),) for count in kept], method, args)


def test_decode_after_pruning_equals_the_pruned_prompt_from_scratch(tiny):
    """Greedy decode with DART's pruned cache against re-running, at every step and without a cache,
    the prompt and the tokens so far with the prefill's kept sets replayed: same tokens and logits."""
    _, model, _ = tiny
    backbone = model.get_model()
    lengths, spans, kept_counts = [40, 31], [30, 22], [12, 12]
    embeds, mask = left_padded_prompts(tiny, lengths)
    args = dart.DARTArgs(k=1, pivot_image=2, pivot_text=3)
    chosen = []

    def recording(features, image_tokens, targets, method_args):
        kept = dart.keep(features, image_tokens, targets, method_args)
        chosen.append(kept.clone())
        return kept

    def replaying(features, image_tokens, targets, method_args):  # the spans' text grows with each step: not kept
        return torch.nn.functional.pad(chosen[0], (0, features.shape[1] - chosen[0].shape[1]))

    needs = {"dart_pivot_features"}
    with torch.no_grad():
        backbone.pruning_request = _request(lengths, spans, kept_counts, types.SimpleNamespace(
            select=recording, needs=needs), args)
        generated = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                   output_logits=True, return_dict_in_generate=True)
        assert chosen[0].sum(1).tolist() == kept_counts  # 2 + 5 * 2
        tokens, reference = (embeds, mask), []
        for _ in range(5):
            backbone.pruning_request = _request(lengths, spans, kept_counts,
                                                types.SimpleNamespace(select=replaying, needs=needs), args)
            position_ids = (tokens[1].cumsum(1) - 1).clamp(min=0)
            logits = model(inputs_embeds=tokens[0], attention_mask=tokens[1], position_ids=position_ids,
                           use_cache=False).logits[:, -1]
            reference.append(logits)
            tokens = (torch.cat([tokens[0], backbone.embed_tokens(logits.argmax(-1))[:, None]], 1),
                      torch.cat([tokens[1], torch.ones(len(lengths), 1, dtype=torch.long)], 1))
    assert generated.sequences.tolist() == torch.stack([step.argmax(-1) for step in reference], 1).tolist()
    for step, logits in zip(generated.logits, reference):
        assert torch.allclose(step, logits, atol=1e-4)


# --- through the tiny checkpoint (2 decoder layers: K = 1) -------------------------------------

def test_full_budget_is_the_vanilla_model(tiny):
    assert_full_budget_is_vanilla(tiny, "dart", ["k=1"])


def test_pruning_changes_the_model_and_is_accounted(tiny):
    _, model, _ = tiny
    ids, mask, pixel_values, sizes = _inputs(tiny, [(800, 500)], ["What is shown?"])
    vanilla = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=1.0, method="globalcom2")
    pruned = _generate(model, ids, mask, pixel_values, sizes, retention_ratio=0.1, method="dart", method_args=["k=1"])
    record = model.last_accounting[0]
    span = record["in_llm"]["span_tokens"]
    kept = 4 + 8 * (min(round(0.1 * span), span - 4) // 8)
    assert record["tokens_after"] == record["tokens_before"] == span  # the image goes in whole
    assert record["post_pruning_image_tokens"] == kept and record["in_llm"]["stages"] == [[1, kept]]
    assert record["layer_image_tokens"] == [span, kept] and record["equivalent_image_tokens"] == (span + kept) / 2
    assert not torch.equal(pruned.logits[0], vanilla.logits[0])
    cache = getattr(pruned, "cache", None) or pruned.past_key_values
    text = ids.shape[1] - 1
    assert [layer.keys.shape[2] for layer in cache.layers] == [text + span + 5, text + kept + 5]


@pytest.mark.parametrize("budget", [dict(retention_ratio=0.25), dict(visual_tokens=100)])
def test_ragged_batch_equals_each_row_alone(tiny, budget):
    """Two images of different shapes and questions of different lengths, left-padded: every row's
    kept tokens, greedy tokens and first logits equal its run alone."""
    _, model, _ = tiny
    sizes, questions = [(800, 500), (400, 900)], ["What is shown?", "Which colour is the sky in this picture?"]
    ids, mask, pixel_values, image_sizes = _inputs(tiny, sizes, questions)
    batched = _generate(model, ids, mask, pixel_values, image_sizes, method="dart", method_args=["k=1"], **budget)
    records = model.last_accounting
    assert records[0]["in_llm"]["span_tokens"] != records[1]["in_llm"]["span_tokens"]
    for row in range(2):
        alone_ids, alone_mask, _, _ = _inputs(tiny, sizes[row:row + 1], questions[row:row + 1])
        alone = _generate(model, alone_ids, alone_mask, pixel_values[row:row + 1], image_sizes[row:row + 1],
                          method="dart", method_args=["k=1"], **budget)
        assert model.last_accounting[0]["post_pruning_image_tokens"] == records[row]["post_pruning_image_tokens"]
        assert batched.sequences[row].tolist() == alone.sequences[0].tolist()
        assert torch.allclose(batched.logits[0][row], alone.logits[0][0], atol=1e-4)


def test_loader_runner_end_to_end(loader_answers):
    rows = loader_answers([(80, 50), (50, 90)], "--method", "dart", "--method-arg", "k=1", "--retention-ratio", "0.25")
    assert len(rows) == 2
    image = rows[0]["metadata"]["images"][0]
    span = image["in_llm"]["span_tokens"]
    assert image["method"] == "dart"
    assert image["post_pruning_image_tokens"] == 4 + 8 * (min(round(0.25 * span), span - 4) // 8)
