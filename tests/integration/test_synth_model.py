"""Model-based generators: ``posttrain synth self-instruct | answers | pairs``.

The filters and the ranking are checked through a scripted engine (the test decides every reply); the
commands end to end through the CLI with the tiny model; every file written must pass ``data check``.
"""

import json
import random
import re
from collections import Counter

import pytest

from posttrain.cli import main
from posttrain.data.overlap import words
from posttrain.data.report import DataReport
from posttrain.data.synthetic import make_prompt_rows, make_task_rows, write_jsonl
from posttrain.data.synthetic.model_based import (
    Ranker,
    Sampler,
    alpaca_fields,
    generate_pairs,
    read_prompt_rows,
    reward_specs,
    run_answers,
    run_pairs,
)
from posttrain.data.synthetic.self_instruct import UNUSED, clean_instruction, run_self_instruct
from posttrain.data.synthetic.settings import AnswerSettings, PairSettings, SelfInstructSettings
from posttrain.data.synthetic.similarity import NoveltyPool, lcs_length, rouge_l
from posttrain.errors import PosttrainError
from posttrain.generation.base import Generation
from tests.judge_server import serve


class ScriptedEngine:
    """A generation engine whose replies ``reply(prompt_text, sample_index)`` gives: text, or (text, finish_reason)."""

    def __init__(self, tokenizer, reply):
        self.tokenizer = tokenizer
        self.reply = reply

    def generate(self, prompts, params):
        out = []
        for i, ids in enumerate(prompts):
            text = self.tokenizer.decode(ids)
            replies = [self.reply(text, k) for k in range(params.n)]
            replies = [r if isinstance(r, tuple) else (r, "stop") for r in replies]
            out.append([Generation(i, [0], [0.0], t, reason) for t, reason in replies])
        return out


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def data_check(path, fmt, capsys):
    capsys.readouterr()
    assert main(["data", "check", str(path), "--format", fmt]) == 0
    n = len(rows(path))
    assert f"{n} of {n} rows kept, 0 dropped" in capsys.readouterr().out


# ---- similarity ---------------------------------------------------------------------------------------------


def test_rouge_l_is_lins_f1_of_the_longest_common_subsequence():
    a, b = "the cat sat on the mat".split(), "the cat lay on a mat".split()
    assert lcs_length(a, b) == 4  # the, cat, on, mat
    assert rouge_l(a, b) == pytest.approx(2 * 4 / (6 + 6))  # R = P = 4/6, F1 = 2PR/(P+R)
    assert rouge_l("a b c".split(), "c b a".split()) == pytest.approx(2 * 1 / 6)  # order matters
    assert rouge_l(a, a) == 1.0 and rouge_l([], a) == 0.0 and rouge_l([], []) == 0.0


FIRST = "summarise the article below in plain words"
SECOND = "then list every person it names"


def test_pool_tells_exact_near_and_similar_repeats_apart():
    pool = NoveltyPool(similarity=0.7, ngram_overlap=0.6, n=3)
    pool.add("Write a poem about the sea")
    pool.add(f"{FIRST} {SECOND}")
    assert pool.check("write a POEM about... the sea!").reason == "exact duplicate"
    # Halves swapped: in-order overlap (ROUGE-L) stays low, most trigrams are shared.
    swapped = f"{SECOND} {FIRST}"
    assert rouge_l(words(swapped), words(f"{FIRST} {SECOND}")) < 0.7
    assert pool.check(swapped).reason == "near duplicate (3-gram Jaccard >= 0.6)"
    verdict = pool.check("Write a short poem about the sea")
    assert verdict.reason == "similar (ROUGE-L >= 0.7)"
    assert verdict.rouge_l == pytest.approx(2 * 6 / (7 + 6))
    novel = pool.check("Explain how a rainbow forms")
    assert novel.reason is None and novel.rouge_l < 0.7
    # Compared only with what was added from index 2 on: nothing yet.
    assert pool.check("Write a poem about the sea", since=2).reason is None


def test_pool_reports_the_highest_rouge_l_in_the_pool_although_it_skips_most_lcs():
    rng = random.Random(0)
    vocab = ["the", "a", "write", "list", "poem", "sea", "story", "about", "three", "short", "name", "cat"]
    texts = [" ".join(rng.choices(vocab, k=rng.randint(3, 12))) for _ in range(300)]
    pool = NoveltyPool(similarity=1.0, ngram_overlap=1.0, n=3)
    for text in texts:
        pool.add(text)
    for _ in range(50):
        candidate = " ".join(rng.choices(vocab, k=rng.randint(3, 12)))
        brute = max(rouge_l(words(candidate), words(text)) for text in texts)
        assert pool.check(candidate).rouge_l == pytest.approx(brute, abs=1e-12)


def test_clean_instruction_keeps_the_first_task_without_its_label():
    assert clean_instruction("Task 9: Explain tides.\nTask 10: Name a bird.") == "Explain tides."
    assert clean_instruction('  9. "Sort these numbers"  ') == "Sort these numbers"
    assert clean_instruction("Task 9:") == ""
    assert clean_instruction("Instruction: Write a haiku about rain") == "Write a haiku about rain"
    # a numbered list of tasks ends at the next number; the task's own numbered lines stay
    assert clean_instruction("9. Explain tides.\n10. Name a bird.") == "Explain tides."
    assert clean_instruction("Task 9: List the steps:\n1. Mix\n2. Bake") == "List the steps:\n1. Mix\n2. Bake"
    # words and numbers that only look like a label are the task's
    assert clean_instruction("Task-based learning: explain it") == "Task-based learning: explain it"
    assert clean_instruction("2.5 kg of flour: how many cups?") == "2.5 kg of flour: how many cups?"


# ---- self-instruct through a scripted engine ------------------------------------------------------------------

SEEDS = ["Write a poem about the sea", "Translate the sentence into French", "List three uses of a paperclip",
         f"{FIRST} {SECOND}"]
KEPT = "Explain how a rainbow forms in the sky"
ROUND_1 = [
    ("write a POEM about the sea!", "exact duplicate"),
    (f"{SECOND} {FIRST}", "near duplicate (3-gram Jaccard >= 0.6)"),
    ("Write a short poem about the sea", "similar (ROUGE-L >= 0.7)"),
    ("Task 9:", "empty instruction"),
    ("Hi there", "too short (< 3 words)"),
    ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen", "too long (> 13 words)"),
    (("Describe a long journey across the", "length"), "truncated instruction (hit --max-new-tokens)"),
    ("Draw an image of a cat", "blocked word"),
    (f"Task 9: {KEPT}", None),
    (KEPT, "exact duplicate"),  # a repeat of a task kept earlier in the same round
    ("Name the largest planet in our solar system", "empty answer"),
    ("Give two reasons to drink enough water daily", "truncated answer (hit --max-new-tokens)"),
    ("Suggest a name for a friendly pet goldfish", None),
]
ROUND_2 = ["Describe how bread rises when it is baked", "Count the vowels in the word banana"]


def instruction_writer():
    script = iter([reply for reply, _ in ROUND_1] + ROUND_2)
    extra = iter(range(1000))

    def reply(text, k):
        if "Here are some tasks" in text:
            return next(script, None) or f"Plan a trip to city number {next(extra)}"
        if "largest planet" in text:
            return ""
        if "drink enough water" in text:
            return "Water keeps", "length"
        return "A fine answer."
    return reply


@pytest.fixture(scope="module")
def self_instruct_run(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("self_instruct")
    seeds = write_jsonl([{"instruction": s, "input": "", "output": "ok"} for s in SEEDS], folder / "seeds.jsonl")
    settings = SelfInstructSettings(n=4, batch_size=len(ROUND_1), max_attempts=2 * len(ROUND_1), max_words=13,
                                    blocked_word=["image"], progress=False)
    sampler = Sampler(ScriptedEngine(tokenizer, instruction_writer()), tokenizer, "scripted")
    summary = run_self_instruct("scripted", seeds, folder / "tasks.jsonl", settings, sampler=sampler)
    return summary, folder


def test_self_instruct_drops_each_kind_of_bad_task_and_counts_every_attempt(self_instruct_run, capsys):
    summary, folder = self_instruct_run
    written = rows(summary.out)
    assert [r["instruction"] for r in written] == [KEPT, "Suggest a name for a friendly pet goldfish", *ROUND_2]
    assert all(r["output"] == "A fine answer." and r["input"] == "" for r in written)
    expected = Counter(reason for _, reason in ROUND_1 if reason)
    expected[UNUSED] = len(ROUND_1) - len(ROUND_2)  # round 2 reached --n after its first two tasks
    assert summary.counts == expected
    assert summary.written + sum(summary.counts.values()) == 2 * len(ROUND_1)  # every attempt counted once
    first = written[0]["synth"]
    assert first["generator"] == "self-instruct" and first["model"] == "scripted" and first["seed"] == 0
    assert first["attempt"] == 9 and 0 < first["rouge_l"] < 0.7
    assert written[0]["source"] == "posttrain synth self-instruct: scripted, seed 0"
    data_check(summary.out, "alpaca", capsys)


def test_self_instruct_compares_with_a_seeds_instruction_not_its_input(tmp_path, tokenizer):
    seeds = write_jsonl([{"instruction": SEEDS[0], "input": "The sea is calm tonight and every star is out"},
                         {"instruction": SEEDS[1]}], tmp_path / "seeds.jsonl")
    shown = []

    def reply(text, k):
        if "Here are some tasks" in text:
            shown.append(text)
            return SEEDS[0]
        return "A fine answer."

    sampler = Sampler(ScriptedEngine(tokenizer, reply), tokenizer, "scripted")
    with pytest.raises(PosttrainError, match=r"no row to write[^\n]*\n  2 x exact duplicate\n"):
        run_self_instruct("scripted", seeds, tmp_path / "tasks.jsonl",
                          SelfInstructSettings(n=1, max_attempts=2, batch_size=2, progress=False), sampler=sampler)
    assert shown and all("every star" not in text and f": {SEEDS[0]}\n" in text for text in shown)


def test_self_instruct_writes_messages_rows_too(tmp_path, tokenizer, capsys):
    seeds = write_jsonl([{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": "ok"}]}
                         for s in SEEDS], tmp_path / "seeds.jsonl")
    sampler = Sampler(ScriptedEngine(tokenizer, instruction_writer()), tokenizer, "scripted")
    summary = run_self_instruct("scripted", seeds, tmp_path / "tasks.jsonl",
                                SelfInstructSettings(n=1, max_words=13, blocked_word=["image"], format="messages",
                                                     progress=False), sampler=sampler)
    assert [r["messages"] for r in rows(summary.out)] == [
        [{"role": "user", "content": KEPT}, {"role": "assistant", "content": "A fine answer."}]]
    data_check(summary.out, "messages", capsys)


def test_contamination_flags_a_generated_task_that_copies_an_eval_question(self_instruct_run, capsys):
    summary, folder = self_instruct_run
    evals = write_jsonl([{"prompt": KEPT + "?"}, {"prompt": "What is the capital city of France?"},
                         {"prompt": "Suggest a name for a friendly pet goldfish"}], folder / "eval.jsonl")
    report = folder / "contamination.json"
    capsys.readouterr()
    assert main(["data", "contamination", "--train", str(summary.out), "--eval", str(evals),
                 "--out", str(report)]) == 0
    assert "2 of 3 eval rows" in capsys.readouterr().out
    assert [c["row"] for c in json.loads(report.read_text())["contaminated"]] == [1, 3]


# ---- answers and pairs through a scripted engine ----------------------------------------------------------------


def test_answers_keep_prompt_rows_of_every_shape_and_report_bad_ones(tmp_path, tokenizer, capsys):
    prompts = write_jsonl([
        {"prompt": "Say hello", "task": "greet"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
                      {"role": "assistant", "content": "red"}]},
        {"instruction": "Name a fruit", "input": "", "output": "apple"},
        {"question": "no known fields"},
        {"prompt": ""},
    ], tmp_path / "prompts.jsonl")

    def reply(text, k):
        return "" if "fruit" in text else ("Blue is" if "colour" in text else "Hello!"), "stop"

    sampler = Sampler(ScriptedEngine(tokenizer, reply), tokenizer, "scripted")
    summary = run_answers("scripted", prompts, tmp_path / "answers.jsonl",
                          AnswerSettings(format="alpaca", progress=False), sampler=sampler)
    written = rows(summary.out)
    assert [(r["instruction"], r["output"], r.get("system")) for r in written] == [
        ("Say hello", "Hello!", None), ("Name a colour", "Blue is", "Be brief.")]
    assert written[0]["synth"] | {"metadata": None} == {
        "generator": "answers", "model": "scripted", "seed": 0, "prompt": f"{prompts}:1", "sample": 0,
        "temperature": 0.0, "finish_reason": "stop", "metadata": None}
    assert summary.counts == Counter({"empty answer": 1})
    text = summary.format()
    assert f"{prompts}:4: unknown row shape" in text and f"{prompts}:5 field 'prompt': empty message" in text
    data_check(summary.out, "alpaca", capsys)


def test_prompts_need_no_answer_and_carry_no_earlier_provenance(tmp_path):
    """Unanswered prompts of every shape are read (Self-Instruct's seed file among them)."""
    path = write_jsonl([
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}]},
        {"conversations": [{"from": "human", "value": "Name a tree"}]},
        {"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast", "is_classification": False,
         "instances": [{"input": "", "output": "Oatmeal."}]},
        {"instruction": "Translate into French", "input": "Good morning"},
        {"prompt": [{"role": "user", "content": "Say hi"}], "task": "greet"},
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
         "source": "posttrain synth answers: m, seed 0", "synth": {"generator": "answers"}, "task": "add"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "system", "content": "late"}]},
    ], tmp_path / "prompts.jsonl")
    read, report = read_prompt_rows(path)
    assert [(r.prompt, r.reference) for r in read] == [
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"}], None),
        ([{"role": "user", "content": "Name a tree"}], None),
        ([{"role": "user", "content": "Suggest a breakfast"}], None),
        ([{"role": "user", "content": "Translate into French\n\nGood morning"}], None),
        ([{"role": "user", "content": "Say hi"}], None),
        ([{"role": "user", "content": "What is 2 + 3?"}], "5"),
    ]
    assert [r.instruction for r in read] == [None, None, "Suggest a breakfast", "Translate into French", None, None]
    assert read[2].metadata == {"id": "seed_task_0", "name": "breakfast", "is_classification": False,
                                "instances": [{"input": "", "output": "Oatmeal."}]}
    assert read[4].metadata == {"task": "greet"} and read[5].metadata == {"task": "add"}
    assert report.total_dropped == 1  # a conversation ending with a system turn is nothing to answer
    assert f"{path}:7" in report.format("prompts")


def test_alpaca_output_refuses_a_prompt_it_cannot_hold():
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
              {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert alpaca_fields(prompt, "f:1") == {"system": "s", "history": [["a", "b"]], "instruction": "c", "input": ""}
    with pytest.raises(PosttrainError, match=r"f:2: a prompt of turns \['user', 'tool'\] cannot be written as alpaca"):
        alpaca_fields([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], "f:2")


def scripted_samples(samples_by_prompt):
    def reply(text, k):
        for key, samples in samples_by_prompt.items():
            if key in text:
                return samples[k]
        raise AssertionError(text)
    return reply


def test_pairs_rank_by_a_rule_reward_with_known_answers(tmp_path, tokenizer, capsys):
    prompts = write_jsonl([
        {"prompt": "What is 2 + 3?", "answer": "5"},
        {"prompt": "Reverse abc", "answer": "cba"},          # every sample wrong: a tie
        {"prompt": "Say hi"},                                 # no reference: exact_match scores nothing
        {"prompt": "What is 3 + 4?", "answer": "7"},
        {"prompt": "What is 1 + 1?", "answer": "2"},          # every sample right: a tie
    ], tmp_path / "prompts.jsonl")
    reply = scripted_samples({"2 + 3": ["4", "5", "6", "5"], "abc": ["abc", "bca", "cab", "xyz"],
                              "Say hi": ["hi", "hello", "hey", "yo"], "3 + 4": ["7", "", "7", "3"],
                              "1 + 1": ["2", "2", "2", "2"]})
    sampler = Sampler(ScriptedEngine(tokenizer, reply), tokenizer, "scripted")
    summary = run_pairs("scripted", prompts, tmp_path / "pairs.jsonl", ["exact_match"],
                        PairSettings(samples=4, batch_size=2, progress=False), sampler=sampler)
    written = rows(summary.out)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in written] == [
        ("What is 2 + 3?", "5", "4"), ("What is 3 + 4?", "7", "3")]
    for r in written:
        assert r["score_chosen"] == 1.0 > r["score_rejected"] == 0.0
        assert r["chosen"] == r["synth"]["reference"]
    assert (written[1]["synth"]["chosen_sample"], written[1]["synth"]["rejected_sample"]) == (0, 3)
    assert written[1]["synth"]["scores"] == {"0": 1.0, "2": 1.0, "3": 0.0}  # sample 1 was empty
    assert summary.counts == Counter({"prompt skipped: all responses tie": 2,
                                      "prompt skipped: fewer than 2 scored responses": 1,
                                      "sample dropped: empty response": 1})
    data_check(summary.out, "preference", capsys)


def test_pairs_ranked_by_a_pairwise_judge_take_the_most_and_least_wins(tmp_path, tokenizer):
    def longer_wins(request):
        text = request["messages"][-1]["content"]
        a, b = (re.search(rf"\[Response {x}\]\n(.*?)\n\[End of Response {x}\]", text, re.S).group(1) for x in "AB")
        if "BROKEN" in (a, b):
            return "I cannot tell."  # no verdict: the comparison fails
        return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "A"  # equal: always "A", so undecided

    base_url, stop = serve(longer_wins)
    try:
        ranker = Ranker(reward_specs([f"{{type: pairwise_judge, base_url: '{base_url}', model: judge}}"]))
        prompts = write_jsonl([{"prompt": "Write something"}, {"prompt": "Say one letter"}, {"prompt": "Judge me"}],
                              tmp_path / "p.jsonl")
        reply = scripted_samples({"something": ["ab", "a", "abcd", "cd"], "one letter": ["x", "y", "z", "w"],
                                  "Judge me": ["BROKEN", "ab", "a", "abcd"]})
        sampler = Sampler(ScriptedEngine(tokenizer, reply), tokenizer, "scripted")
        encoded = sampler.encode_rows(read_prompt_rows(prompts)[0], 256, DataReport())
        written, counts = generate_pairs(sampler, encoded, ranker, PairSettings(progress=False))
    finally:
        stop()
    # a score is the share of a response's decided comparisons it won ("ab" vs "cd" is undecided)
    assert written[0]["synth"]["scores"] == {"0": 0.5, "1": 0.0, "2": 1.0, "3": 0.5}
    # a response whose every comparison failed is unscored, not the loser
    assert written[1]["synth"]["scores"] == {"0": None, "1": 0.5, "2": 0.0, "3": 1.0}
    assert [(r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in written] == [
        ("abcd", "a", 1.0, 0.0), ("abcd", "a", 1.0, 0.0)]
    assert counts == Counter({"prompt skipped: the pairwise judge decided no comparison": 1})


def test_reward_specs_from_names_folders_yaml_and_files(tmp_path):
    (tmp_path / "rm" / "final").mkdir(parents=True)
    spec_file = tmp_path / "rewards.yaml"
    spec_file.write_text("- {type: exact_match}\n- {type: length_penalty, max_chars: 50, weight: 0.1}\n")
    assert reward_specs(["numeric_match", str(tmp_path / "rm"), "{type: regex, pattern: '^[0-9]+$'}",
                         str(spec_file)]) == [
        {"type": "numeric_match"}, {"type": "reward_model", "path": str(tmp_path / "rm" / "final")},
        {"type": "regex", "pattern": "^[0-9]+$"}, {"type": "exact_match"},
        {"type": "length_penalty", "max_chars": 50, "weight": 0.1}]
    with pytest.raises(PosttrainError, match="not a reward type, a reward model folder"):
        reward_specs(["runs/missing-rm"])
    with pytest.raises(PosttrainError, match="cannot be combined"):
        Ranker([{"type": "pairwise_judge", "base_url": "http://localhost:1/v1", "model": "j"}, {"type": "exact_match"}])


# ---- the commands with the tiny model -------------------------------------------------------------------------

# A random tiny model rarely ends a turn on its own: its replies are kept although cut off.
TINY = ["--keep-truncated", "--no-progress", "--max-new-tokens", "8"]


def test_self_instruct_with_the_tiny_model_writes_alpaca_rows(tiny_model, tmp_path, capsys):
    seeds = write_jsonl(make_task_rows(20, seed=0, fmt="alpaca"), tmp_path / "seeds.jsonl")
    out = tmp_path / "tasks.jsonl"
    assert main(["synth", "self-instruct", "--model", str(tiny_model), "--seeds", str(seeds), "--n", "3",
                 "--out", str(out), "--batch-size", "4", "--answer-max-new-tokens", "8", "--answer-temperature", "1",
                 "--min-words", "1", *TINY]) == 0
    assert "3 rows -> " in capsys.readouterr().out
    assert [r["synth"]["generator"] for r in rows(out)] == ["self-instruct"] * 3
    data_check(out, "alpaca", capsys)


def test_answers_with_the_tiny_model_are_reproducible_and_show_progress(tiny_model, tmp_path, capsys):
    prompts = write_jsonl(make_prompt_rows(6, seed=3), tmp_path / "prompts.jsonl")
    args = ["synth", "answers", "--model", str(tiny_model), "--prompts", str(prompts), "--samples", "2",
            "--temperature", "1", "--batch-size", "4", *TINY]
    assert main([*args, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.jsonl"), "--progress"]) == 0
    # tqdm's bar: done/total [elapsed<remaining, rate]
    assert re.search(r"answers: 100%.*6/6 \[\d\d:\d\d<\d\d:\d\d", capsys.readouterr().err)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    written = rows(tmp_path / "a.jsonl")
    assert [r["synth"]["sample"] for r in written] == [0, 1] * 6
    assert written[0]["messages"][0] == {"role": "user", "content": json.loads(prompts.read_text().split("\n")[0])[
        "prompt"]}
    data_check(tmp_path / "a.jsonl", "messages", capsys)


def test_pairs_with_the_tiny_model_prefer_the_shorter_response_under_a_length_penalty(tiny_model, tmp_path, capsys):
    prompts = write_jsonl(make_prompt_rows(6, seed=3), tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    assert main(["synth", "pairs", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out),
                 "--reward", "{type: length_penalty, max_chars: 0, per_unit: 1.0}", *TINY]) == 0
    written = rows(out)
    assert written
    for r in written:  # the penalty is -1 per character: recomputed here from the texts written
        assert r["score_chosen"] == -len(r["chosen"]) > r["score_rejected"] == -len(r["rejected"])
        assert r["synth"]["scores"][str(r["synth"]["chosen_sample"])] == max(r["synth"]["scores"].values())
    data_check(out, "preference", capsys)


@pytest.mark.parametrize("args, message", [
    (["self-instruct", "--seeds", "missing.jsonl", "--n", "2"], "seed tasks file missing.jsonl: no such file"),
    (["self-instruct", "--seeds", "{bad}", "--n", "2"], "bad.jsonl:1: unknown row shape"),
    (["self-instruct", "--seeds", "{good}", "--n", "2", "--min-words", "5", "--max-words", "2"],
     "--min-words (5) is above --max-words (2)"),
    (["self-instruct", "--seeds", "{good}", "--n", "5", "--max-attempts", "3"], "--max-attempts (3) is below --n (5)"),
    (["answers", "--prompts", "{good}", "--samples", "3"], "--samples 3 with --temperature 0"),
    (["answers", "--prompts", "{good}", "--engine", "vllm"], "--engine vllm"),  # no vLLM, or no GPU for it
    (["pairs", "--prompts", "{good}", "--reward", "exact_mtch"], "field 'type' is 'exact_mtch'; allowed: exact_match"),
    (["pairs", "--prompts", "{good}", "--reward", "exact_match", "--samples", "1"],
     "--samples: Input should be greater than or equal to 2"),
])
def test_bad_input_is_refused_before_any_model_is_loaded(tmp_path, capsys, args, message):
    files = {"{good}": str(write_jsonl(make_prompt_rows(2, seed=0), tmp_path / "good.jsonl")),
             "{bad}": str(write_jsonl([{"question": "?"}], tmp_path / "bad.jsonl"))}
    args = [files.get(a, a) for a in args]
    # No such model: a command that reached the model would fail with another message.
    assert main(["synth", *args, "--model", "no-such-model", "--out", str(tmp_path / "out.jsonl")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_model_that_cannot_load_is_named_by_its_option(tmp_path, capsys):
    prompts = write_jsonl(make_prompt_rows(2, seed=0), tmp_path / "p.jsonl")
    (tmp_path / "empty").mkdir()
    assert main(["synth", "answers", "--model", str(tmp_path / "empty"), "--prompts", str(prompts),
                 "--out", str(tmp_path / "a.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"cannot load the tokenizer of --model {tmp_path / 'empty'} (folder)" in err
    assert "model.name_or_path" not in err


def test_the_context_is_the_models_positions_not_the_tokenizers_limit(tiny_model):
    from transformers import AutoConfig

    from posttrain.data.synthetic.model_based import context_length

    assert context_length(AutoConfig.from_pretrained(tiny_model)) == 1024
    # a vision-language model keeps it in its text config
    nested = AutoConfig.for_model("llava", text_config={"model_type": "llama", "max_position_embeddings": 333})
    assert context_length(nested) == 333


def test_out_must_be_a_jsonl_file(tmp_path, capsys):
    prompts = write_jsonl(make_prompt_rows(2, seed=0), tmp_path / "p.jsonl")
    assert main(["synth", "answers", "--model", "m", "--prompts", str(prompts), "--out", str(tmp_path / "a.json")]) == 2
    assert "name the file *.jsonl" in capsys.readouterr().err


def test_pairs_ranked_by_a_reward_model_folder_agree_with_its_scores(tiny_model, tmp_path, capsys):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    from posttrain.eval.reward_score import RewardScorer

    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels = 1
    torch.manual_seed(0)
    rm = tmp_path / "rm"  # an untrained head: any fixed scorer will do to check the ranking
    LlamaForSequenceClassification(config).save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(rm)
    prompts = write_jsonl(make_prompt_rows(4, seed=3), tmp_path / "prompts.jsonl")
    out = tmp_path / "pairs.jsonl"
    assert main(["synth", "pairs", "--model", str(tiny_model), "--prompts", str(prompts), "--out", str(out),
                 "--reward", str(rm), "--temperature", "1", *TINY]) == 0
    written = rows(out)
    assert len(written) == 4  # continuous scores: no ties
    scorer = RewardScorer(rm)
    for r in written:
        prompt = [{"role": "user", "content": r["prompt"]}]
        chosen, rejected = scorer.score([prompt + [{"role": "assistant", "content": r[k]}]
                                         for k in ("chosen", "rejected")])
        assert r["score_chosen"] == pytest.approx(chosen, abs=1e-4) and r["score_rejected"] == pytest.approx(
            rejected, abs=1e-4)
        assert chosen > rejected and r["synth"]["reward"] == ["reward_model"]
    data_check(out, "preference", capsys)
