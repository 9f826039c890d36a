"""Zoo task suites: v1 byte-identical to tasks.py, v2's sizes in range, answers recomputed from the text, OOD held out."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import replace

import pytest

from densecomm_core.relay import ContextMode, PromptFormat
from densecomm_core.zoo import build, tasks, tasks_v2
from densecomm_core.zoo.suite import SUITES, get_suite
from densecomm_core.zoo.tokenizer import build_tokenizer

V1, V2 = get_suite("v1"), get_suite("v2")
PER_FAMILY = 300

# sha256 fingerprints of tasks.make_split at commit 96fc9d5, before any suite existed: v1 must never move.
V1_FINGERPRINTS = {("train", 300): "494b79874e26203f", ("validation", 100): "574bc9d13fa47c48", ("test", 200): "1ed600c4a09650a2"}


@pytest.fixture(scope="module")
def v2_train():
    return V2.make_split("train", PER_FAMILY)


# ---- v1 is unchanged ---------------------------------------------------------------------------------


@pytest.mark.parametrize("split,per_family", list(V1_FINGERPRINTS))
def test_v1_splits_keep_their_fingerprints(split, per_family):
    want = V1_FINGERPRINTS[(split, per_family)]
    assert tasks.split_fingerprint(tasks.make_split(split, per_family)) == want
    assert tasks.split_fingerprint(V1.make_split(split, per_family)) == want
    assert tasks.split_fingerprint(V1.adapter_split(split, per_family)) == want  # v1 has no OOD family


def test_v1_suite_draws_the_same_training_stream_as_tasks():
    a, b = random.Random(7), random.Random(7)
    assert [tasks.sample_in_split(a, "train") for _ in range(500)] == [V1.sample_in_split(b, "train") for _ in range(500)]
    a, b = random.Random(8), random.Random(8)
    assert [tasks.sample_in_split(a, "validation", "choice") for _ in range(50)] == [
        V1.sample_in_split(b, "validation", "choice") for _ in range(50)]
    assert V1.family_names == tasks.FAMILIES and V1.chance == tasks.CHANCE and V1.out_of_domain == ()


def test_v2_vocabulary_appends_to_v1_so_v1_token_ids_stay():
    v1, v2 = build_tokenizer().get_vocab(), build_tokenizer(V2.vocabulary).get_vocab()
    assert len(set(V2.vocabulary)) == len(V2.vocabulary)
    assert V2.vocabulary[: len(tasks.VOCABULARY)] == tasks.VOCABULARY
    assert all(v2[word] == i for word, i in v1.items())
    assert len(v2) == len(v1) + len(tasks_v2.NEW_WORDS)


def test_v1_recipe_is_unchanged():
    assert build.zoo_recipe("v1") is build.ZOO_MODELS
    assert all(config.suite == "v1" for _, config in build.ZOO_MODELS)
    with pytest.raises(ValueError, match="no zoo recipe"):
        build.zoo_recipe("v3")


# ---- v2: sizes, answers, OOD, splits -----------------------------------------------------------------


def facts_of(listing: str) -> list[tuple[str, str]]:
    return [tuple(fact.split()) for fact in listing.split(" , ")]


def sections(example: tasks.Example) -> list[str]:
    """The context without its family word and final "?", cut at " . "."""
    words = example.context.split()
    assert words[0] == example.family and words[-1] == "?"
    return " ".join(words[1:-1]).split(" . ")


def solve(example: tasks.Example) -> tuple[str, dict[str, int]]:
    """The answer recomputed from the context alone, independently of tasks_v2, and the example's sizes."""
    family, parts = example.family, sections(example)
    if family == "math":
        words = parts[0].split()
        value = int(words[0])
        for op, digit in zip(words[1::2], words[2::2]):
            value = (value + int(digit)) % 10 if op == "+" else (value - int(digit)) % 10
        return str(value), {"operands": (len(words) + 1) // 2}
    if family == "recall":
        listing, name = parts
        facts = facts_of(listing)
        real = [(k, v) for k, v in facts if k in tasks.NAMES]
        assert all(k in tasks.ANIMALS and v in tasks.COLORS for k, v in facts if k not in tasks.NAMES)
        assert [k for k, _ in real].count(name) == 1
        return dict(real)[name], {"facts": len(real), "distractors": len(facts) - len(real)}
    if family == "choice":
        listing, options, animal = parts
        facts = facts_of(listing)
        real = {k: v for k, v in facts if k in tasks.ANIMALS}
        letter_of = {colour: letter for colour, letter in facts_of(options)}
        assert [letter for _, letter in facts_of(options)] == list(tasks_v2.LETTERS_V2[: len(letter_of)])
        return letter_of[real[animal]], {"facts": len(real), "distractors": len(facts) - len(real), "options": len(letter_of)}
    if family == "hops":
        listing, head = parts
        edges = facts_of(listing)
        follow = dict(edges)
        assert len(follow) == len(edges)  # no key twice
        targets = {v for _, v in edges}
        heads = [k for k, _ in edges if k not in targets]
        node, hops = head, 0
        while node in follow:
            node, hops = follow[node], hops + 1
        assert node in tasks.DIGITS and head in heads
        return node, {"hops": hops, "other_chains": len(heads) - 1}
    if family == "compare":
        listing, ask = parts
        facts = facts_of(listing)
        pick = max if ask == "max" else min
        best = pick(facts, key=lambda kv: int(kv[1]))
        assert len({v for _, v in facts}) == len(facts)  # no tie
        return best[0], {"entities": len(facts)}
    if family == "owner":
        listing, animal = parts
        facts = facts_of(listing)
        owners = [k for k, a in facts if a == animal]
        assert len(owners) == 1
        return owners[0], {"facts": len(facts)}
    raise AssertionError(f"no independent solver for {family!r}")


def test_v2_answers_match_an_independent_solver_and_the_trace(v2_train):
    for e in v2_train:
        answer, _ = solve(e)
        assert e.answer == answer, e
        assert tasks.extract_answer(e.trace) == e.answer
        assert len(e.trace.split()) < 24  # the trace fits the zoo's 24-token greedy generation


def test_v2_sizes_cover_exactly_their_documented_ranges(v2_train):
    seen: dict[str, dict[str, set[int]]] = {f: {k: set() for k in sizes} for f, sizes in tasks_v2.SIZES.items()}
    for e in v2_train:
        for what, size in solve(e)[1].items():
            seen[e.family][what].add(size)
    for family, sizes in tasks_v2.SIZES.items():
        for what, (low, high) in sizes.items():
            assert seen[family][what] == set(range(low, high + 1)), (family, what, seen[family][what])


def test_v2_marks_two_families_out_of_domain_and_adapters_never_see_them():
    assert set(V2.out_of_domain) == {"compare", "owner"} and set(V2.in_domain) == {"recall", "math", "choice", "hops"}
    for split in ("train", "validation", "test"):
        assert {e.family for e in V2.adapter_split(split, 20)} == set(V2.in_domain)
    # The LMs do train on them: the build's stream (uniform or weighted) draws OOD families too.
    rng = random.Random(0)
    assert {V2.sample_in_split(rng, "train").family for _ in range(300)} == set(V2.family_names)
    for _, config in build.zoo_recipe("v2"):
        assert config.suite == "v2" and set(config.family_weights) == set(V2.family_names)
        assert all(config.family_weights[f] > 0 for f in V2.out_of_domain)


def test_v2_splits_are_deterministic_disjoint_and_fingerprinted():
    assert V2.make_split("test", 30) == V2.make_split("test", 30)
    assert tasks.split_fingerprint(V2.make_split("test", 30)) == tasks.split_fingerprint(V2.make_split("test", 30))
    contexts = {s: {e.context for e in V2.make_split(s, n)} for s, n in (("train", 300), ("validation", 100), ("test", 100))}
    assert not (contexts["train"] & contexts["validation"]) and not (contexts["train"] & contexts["test"])
    assert not (contexts["validation"] & contexts["test"])
    assert all(tasks.split_of(c) == s for s, cs in contexts.items() for c in cs)
    # A context is on the same side in every suite: no v1 test context is ever v2 training data.
    assert not ({e.context for e in V1.make_split("test", 200)} & contexts["train"])


def test_v2_answers_are_spread_so_no_input_means_near_chance(v2_train):
    by_family: dict[str, Counter] = {}
    for e in v2_train:
        by_family.setdefault(e.family, Counter())[e.answer] += 1
    for family, counts in by_family.items():
        top_share = counts.most_common(1)[0][1] / sum(counts.values())
        assert top_share <= V2.family(family).chance + 0.1, (family, counts.most_common(3))


def test_v2_hops_has_no_single_digit_shortcut(v2_train):
    for e in v2_train:
        if e.family == "hops":
            digits = [w for w in e.context.split() if w in tasks.DIGITS]
            assert len(digits) >= 2  # every chain ends at a digit; at least two chains


def test_v2_prompts_fit_the_relay_format_and_the_tokenizer(v2_train):
    tokenizer = build_tokenizer(V2.vocabulary)
    fmt = PromptFormat()
    for e in v2_train[:120]:
        assert fmt.with_input.format(context=e.context) == tasks.prompt_with_input(e)
        assert fmt.receiver_prompt(ContextMode.AWARE, e.context) == tasks.prompt_with_input(e)
        for text in (tasks.prompt_duplicated(e) + " " + e.trace, tasks.prompt_guided(e) + " " + e.trace):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.unk_token_id not in ids and len(ids) < 256  # max_position_embeddings of the zoo LMs


def test_unknown_suite_family_and_split():
    with pytest.raises(ValueError, match="unknown task suite"):
        get_suite("v9")
    with pytest.raises(ValueError, match="unknown task family 'poetry' in suite 'v2'"):
        V2.sample_example(random.Random(0), "poetry")
    with pytest.raises(ValueError, match="unknown split"):
        V2.make_split("dev", 1)
    assert set(SUITES) == {"v1", "v2"}


# ---- v2 recipe ------------------------------------------------------------------------------------


def non_embedding_params(spec: build.ZooModelSpec) -> int:
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    attention = 2 * spec.hidden_size * q + 2 * spec.hidden_size * kv
    return spec.num_layers * (attention + 3 * spec.hidden_size * spec.intermediate_size)


def test_v2_receiver_is_the_smaller_and_shallower_model_of_a_heterogeneous_pair():
    (sender, _), (receiver, _) = build.zoo_recipe("v2")
    assert (sender.family, receiver.family) == ("qwen3", "llama")
    assert receiver.num_layers < sender.num_layers and non_embedding_params(receiver) < non_embedding_params(sender)
    for field in ("hidden_size", "num_layers", "num_kv_heads", "head_dim", "rope_theta"):
        assert getattr(sender, field) != getattr(receiver, field), field
    # hops needs about h + 1 layers: the receiver cannot follow the longest chains, the sender can.
    longest = tasks_v2.SIZES["hops"]["hops"][1]
    assert receiver.num_layers < longest + 1 <= sender.num_layers
    assert {s.name for s, _ in build.zoo_recipe("v2")}.isdisjoint({s.name for s, _ in build.zoo_recipe("v1")})


def test_v2_smoke_stage_trains_saves_and_records_its_suite(tmp_path):
    spec = build.ZooModelSpec("tiny-v2", "llama", 32, 2, 4, 2, 8, 64, 10_000.0)
    config = build.smoke_config(replace(build.RECEIVER_TRAIN_V2, eval_per_family=2, batch_size=8), 3)
    result = build.train_zoo_model(spec, config, tmp_path / spec.name, progress=False)
    assert result.steps == 3 and set(result.validation_accuracy) == set(V2.family_names)
    recipe = json.loads((tmp_path / spec.name / "zoo_recipe.json").read_text())
    assert recipe["train"]["suite"] == "v2" and [s["stage"] for s in recipe["stages"]] == [1]  # no restart
    assert result.tally.evaluations == 1 and 0 < result.tally.eval_cpu_seconds <= result.tally.cpu_seconds
    saved = json.loads((tmp_path / spec.name / "tokenizer.json").read_text())["model"]["vocab"]
    assert set(saved) == set(V2.vocabulary)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        build.smoke_config(config, 0)


def test_projection_scales_measured_step_and_validation_rates():
    spec, _ = build.zoo_recipe("v2")[0]
    tally = build.StageTally(cpu_seconds=30.0, eval_seconds=10.0, eval_cpu_seconds=4.0, evaluations=2)
    result = build.ZooTrainResult(spec, steps=100, seconds=60.0, tally=tally)
    config = replace(build.SENDER_TRAIN_V2, max_steps=1000, eval_every=400, restart_steps=0)
    assert result.projected_seconds(config) == pytest.approx(0.5 * 1000 + 5.0 * 3)  # 3 validation runs: 400, 800, 1000
    assert result.projected_seconds(config, cpu=True) == pytest.approx(0.26 * 1000 + 2.0 * 3)
    restarted = replace(config, restart_steps=500)  # the warm restart's steps and validation runs (400, 500) too
    assert result.projected_seconds(restarted) == pytest.approx(0.5 * 1500 + 5.0 * 5)


def test_cli_never_builds_a_smoke_zoo_over_the_committed_one():
    from densecomm_core.zoo.pair import zoo_root
    from services.cli import build_parser

    for argv in (["zoo", "build", "--suite", "v2", "--max-steps", "5", "--output", str(zoo_root())],
                 ["zoo", "build", "--max-steps", "5", "--out", str(zoo_root())],
                 ["zoo", "build", "--suite", "v2", "--max-steps", "5", "--adapter-only"]):
        args = build_parser().parse_args(argv)
        with pytest.raises(SystemExit, match="never the committed zoo, and has no adapter"):
            args.func(args)


# ---- the LM training stream: message documents, length-grouped batches --------------------------------


def test_message_documents_use_the_suites_t2t_layouts_and_v1_has_none():
    config = replace(build.SENDER_TRAIN_V2, p_hint=0.0, p_duplicated=0.0, p_message=1.0)
    rng = random.Random(3)
    fmt = V2.prompt_format
    seen = set()
    for _ in range(40):
        e = V2.sample_example(rng)
        text, predictable = build.training_document(e, rng, config)
        aware, unaware = fmt.t2t_prompt(ContextMode.AWARE, e.context, e.trace), fmt.t2t_prompt(ContextMode.UNAWARE, e.context, e.trace)
        assert text in (f"{aware} {e.trace}", f"{unaware} {e.trace}") and predictable == 0
        seen.add(text.startswith(tasks_v2.MESSAGE_WORD))
    assert seen == {True, False}  # both layouts occur
    assert build.SENDER_TRAIN.p_message == 0.0 and build.RECEIVER_TRAIN.p_message == 0.0  # v1's stream is unchanged


def test_length_groups_find_the_least_padded_split():
    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 9))]
        groups = build.length_groups(lengths, 3)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths))) and 1 <= len(groups) <= 3

        def area(gs):
            return sum(len(g) * max(lengths[i] for i in g) for g in gs)

        order = sorted(range(len(lengths)), key=lengths.__getitem__)  # brute force over every 1-3 way cut
        cuts = [(a, b) for a in range(len(order) + 1) for b in range(a, len(order) + 1)]
        brute = min(area([g for g in (order[:a], order[a:b], order[b:]) if g]) for a, b in cuts)
        assert area(groups) == brute


def test_length_grouped_loss_and_gradient_equal_one_padded_batch():
    import torch

    tokenizer = build_tokenizer(V2.vocabulary)
    torch.manual_seed(0)
    model = build.build_model(build.SENDER_SPEC_V2, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                              tokenizer.eos_token_id)
    rng = random.Random(1)
    documents = [build.training_document(V2.sample_example(rng), rng, build.SENDER_TRAIN_V2) for _ in range(24)]
    ids, mask, labels = build.encode_documents(tokenizer, documents)
    whole = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    whole.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    grouped = build.batch_loss(model, tokenizer, documents, max_groups=3)
    grouped.backward()
    torch.testing.assert_close(grouped, whole, rtol=1e-6, atol=1e-6)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)
