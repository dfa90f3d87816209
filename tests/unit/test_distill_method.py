"""Distillation's plug-in against hand-computed values, its config refusals, its tokenizer check and the batches
of an on-policy step."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from posttrain.config import load_config
from posttrain.data.collate import collate
from posttrain.errors import ConfigError, PosttrainError
from posttrain.trainers.distill import (
    CachedRow,
    DistillMethod,
    check_shared_tokenizer,
    special_token_difference,
    tokenizer_difference,
)

IGNORE = -100
LN3 = math.log(3.0)


class FixedLogits(torch.nn.Module):
    """A stand-in model whose logits at each position are given (the inputs only set the batch size)."""

    config = SimpleNamespace(model_type="fixed")  # no LM head of its own to split off: the full-logits path

    def __init__(self, logits: list[list[float]]):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor([logits]))

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return SimpleNamespace(logits=self.logits.expand(input_ids.shape[0], -1, -1))


def config(**distill):
    raw = {"model": {"name_or_path": "student"}, "method": "distill", "data": {"train": "rows.jsonl"},
           "output_dir": "out", "distill": {"teacher": "teacher", **distill}}
    return load_config(None, raw=raw)


# One sample of three tokens: position 0 predicts target 1, position 1 predicts target 0.
BATCH = collate([[([5, 6, 7], [IGNORE, 1, 0])]], pad_id=0)
# Student q0 = softmax([0, 0]) = [1/2, 1/2], q1 = softmax([ln 3, 0]) = [3/4, 1/4];
# teacher p0 = softmax([0, ln 3]) = [1/4, 3/4], p1 = [1/2, 1/2]. Position 2 predicts nothing.
STUDENT = [[0.0, 0.0], [LN3, 0.0], [5.0, -5.0]]
TEACHER = [[0.0, LN3], [0.0, 0.0], [-5.0, 5.0]]
NLL = math.log(2.0) + math.log(4 / 3)  # -ln q0(1) - ln q1(0)
KL = (0.25 * math.log(0.5) + 0.75 * math.log(1.5)) + (0.5 * math.log(2 / 3) + 0.5 * math.log(2.0))


def _kl_at_t2() -> float:
    """KL(p || q) of both positions with every logit divided by T = 2."""
    s = math.sqrt(3.0)
    p0, q1 = [1 / (1 + s), s / (1 + s)], [s / (1 + s), 1 / (1 + s)]
    return (p0[0] * math.log(2 * p0[0]) + p0[1] * math.log(2 * p0[1])
            + 0.5 * math.log(0.5 / q1[0]) + 0.5 * math.log(0.5 / q1[1]))


@pytest.mark.parametrize("hard_weight, temperature", [(0.0, 1.0), (0.3, 1.0), (0.3, 2.0), (0.8, 2.0)])
def test_loss_is_hard_weight_nll_plus_the_rest_times_t_squared_kl(hard_weight, temperature):
    method = DistillMethod(0, config(hard_weight=hard_weight, temperature=temperature), FixedLogits(TEACHER))
    loss, metrics = method.loss(FixedLogits(STUDENT), BATCH)
    kl = KL if temperature == 1.0 else _kl_at_t2()
    soft = temperature**2 * kl
    assert KL == pytest.approx(0.274653, abs=1e-6) and _kl_at_t2() == pytest.approx(0.073593, abs=1e-6)
    assert method.count(BATCH) == 2
    assert float(loss.detach()) == pytest.approx(hard_weight * NLL + (1 - hard_weight) * soft, rel=1e-6)
    assert float(metrics["nll"]) == pytest.approx(NLL, rel=1e-6)
    assert float(metrics["distill"]) == pytest.approx(soft, rel=1e-6)


def test_the_gradient_reaches_the_student_only():
    teacher, student = FixedLogits(TEACHER), FixedLogits(STUDENT)
    loss, _ = DistillMethod(0, config(), teacher).loss(student, BATCH)
    loss.backward()
    assert teacher.logits.grad is None
    # d KL(p || q) / d student logits = q - p at each trained position; nothing at the last one.
    expected = torch.tensor([[[0.25, -0.25], [0.25, -0.25], [0.0, 0.0]]])
    assert torch.allclose(student.logits.grad, expected, atol=1e-6)


# Three ids, two trained positions: the teacher's top 2 leave it some probability on the third id.
STUDENT3 = [[0.5, -1.0, 2.0], [1.5, 0.3, -0.7], [0.0, 0.0, 0.0]]
TEACHER3 = [[1.2, 0.4, -0.3], [-0.2, 1.1, 0.6], [0.0, 0.0, 0.0]]


def _coarse_kl_by_hand(temperature: float) -> float:
    """Forward KL over {top-1, top-2, the rest} at both trained positions, from the softmaxes in numpy."""
    total = 0.0
    for s, t in zip(STUDENT3[:2], TEACHER3[:2]):
        p = np.exp(np.array(t) / temperature) / np.exp(np.array(t) / temperature).sum()
        q = np.exp(np.array(s) / temperature) / np.exp(np.array(s) / temperature).sum()
        top = np.argsort(-p)[:2]
        pc = [*p[top], 1 - p[top].sum()]
        qc = [*q[top], 1 - q[top].sum()]
        total += sum(a * math.log(a / b) for a, b in zip(pc, qc))
    return temperature**2 * total


def _cache_by_hand(temperature: float):
    """The teacher's top 2 at the two trained positions, laid out as the cache stores them."""
    t = np.array(TEACHER3[:2]) / temperature
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    top = np.argsort(-logp, axis=-1)[:, :2]
    lp = np.take_along_axis(logp, top, -1)
    rest = np.log(1 - np.exp(lp).sum(-1))
    return lp.astype(np.float32), top.astype(np.int32), rest.astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cached_top_k_rows_give_the_live_top_k_loss_on_k_plus_one_categories(temperature):
    live = DistillMethod(0, config(topk=2, temperature=temperature), FixedLogits(TEACHER3))
    expected = live.loss(FixedLogits(STUDENT3), BATCH)[1]["distill"]
    cached = DistillMethod(0, config(teacher_cache="topk", topk=2, temperature=temperature), vocab=3)
    batch = cached.collate([CachedRow([([5, 6, 7], [IGNORE, 1, 0])], [_cache_by_hand(temperature)])])
    got = cached.loss(FixedLogits(STUDENT3), batch)[1]["distill"]
    assert float(got) == pytest.approx(float(expected), rel=1e-5)
    assert float(got) == pytest.approx(_coarse_kl_by_hand(temperature), rel=1e-5)
    # One id outside the top 2 is a category of its own: here the k + 1 categories lose nothing.
    full = DistillMethod(0, config(temperature=temperature), FixedLogits(TEACHER3)).loss(FixedLogits(STUDENT3), BATCH)
    assert float(got) == pytest.approx(float(full[1]["distill"]), rel=1e-5) and float(got) > 0.1


def test_top_k_sees_the_probability_the_student_puts_outside_the_teachers_k_ids():
    # The teacher all on id 0 (k = 1), the student 0.9 on id 2. Coarsened to {id 0, the rest}: p = [1, 0],
    # q = [0.05, 0.95], at both trained positions. (Restricted to the k ids alone, both would be [1]: loss 0.)
    teacher = [[0.0, -1e4, -1e4]] * 3
    student = [[math.log(0.05), math.log(0.05), math.log(0.9)]] * 3
    m = [0.3 + 0.7 * 0.05, 0.7 * 0.95]  # jsd_beta = 0.3
    jsd = 0.3 * math.log(1 / m[0]) + 0.7 * (0.05 * math.log(0.05 / m[0]) + 0.95 * math.log(0.95 / m[1]))
    expected = {"forward_kl": 2 * math.log(20.0), "jsd": 2 * jsd}
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        kw = {"loss": kind, **({"jsd_beta": 0.3} if kind == "jsd" else {})}
        got = DistillMethod(0, config(topk=1, **kw), FixedLogits(teacher)).loss(FixedLogits(student), BATCH)[0].detach()
        full = DistillMethod(0, config(**kw), FixedLogits(teacher)).loss(FixedLogits(student), BATCH)[0].detach()
        if kind == "reverse_kl":  # q's 0.95 where the teacher has e^-10000: huge, as in the full divergence
            assert float(got) > 1000
        else:
            assert float(got) == pytest.approx(expected[kind], rel=1e-5), kind
        assert float(got) <= float(full) * (1 + 1e-6), kind
    assert expected["jsd"] == pytest.approx(0.997405, abs=1e-6)


def test_the_lm_heads_run_only_at_the_trained_positions_with_the_full_logits_values(model):
    import copy

    student, teacher = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(0.01 * torch.randn_like(param))
    batch = collate([[([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9])], [([5, 6, 7], [IGNORE, IGNORE, 7])]], pad_id=0)
    rows = []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[:-1]))
             for m in (student, teacher)]
    losses = {}
    for chunked in (True, False):
        rows.clear()
        raw = {"model": {"name_or_path": "student"}, "method": "distill", "data": {"train": "rows.jsonl"},
               "output_dir": "out", "distill": {"teacher": "t", "hard_weight": 0.3},
               "training": {"chunked_head": chunked}}
        method = DistillMethod(0, load_config(None, raw=raw), teacher)
        losses[chunked] = method.loss(student, batch)
        # Chunked: the student's and the teacher's heads each see the 4 trained positions only.
        assert rows == ([torch.Size([4])] * 2 if chunked else [torch.Size([2, 5])] * 2), rows
    for h in hooks:
        h.remove()
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses[True][1]["distill"], losses[False][1]["distill"], rtol=1e-10, atol=1e-12)


def test_a_packed_row_lines_the_cache_up_with_each_sample():
    cfg = config(teacher_cache="topk", topk=2)
    row = CachedRow([([5, 6], [IGNORE, 1]), ([7, 8, 9], [IGNORE, IGNORE, 0])],
                    [(np.array([[-0.1, -2.6]], np.float32), np.array([[1, 0]], np.int32),
                      np.array([-3.0], np.float32)),
                     (np.array([[-0.2, -1.9]], np.float32), np.array([[0, 1]], np.int32),
                      np.array([-4.0], np.float32))])
    batch = DistillMethod(0, cfg).collate([row])
    # Sample 1's target (position 1) is predicted at 0; sample 2's (position 2 + 2) at 3.
    assert batch["teacher_logps"][0, 0].tolist() == pytest.approx([-0.1, -2.6])
    assert batch["teacher_logps"][0, 3].tolist() == pytest.approx([-0.2, -1.9])
    assert batch["teacher_ids"][0, 3].tolist() == [0, 1]
    assert batch["teacher_rest"][0, [0, 3]].tolist() == [-3.0, -4.0]
    assert batch["teacher_logps"][0, [1, 2]].abs().sum() == 0 and batch["teacher_rest"][0, [1, 2]].abs().sum() == 0


@pytest.mark.parametrize("distill, data, message", [
    ({"teacher": None}, None, "needs distill.teacher"),
    ({"mode": "sequence", "hard_weight": 0.5}, "prompt", "distill.hard_weight: not used by distill.mode=sequence"),
    ({"mode": "sequence", "topk": 20}, "prompt", "distill.topk: not used by distill.mode=sequence"),
    ({"mode": "on_policy", "teacher_cache": "topk", "topk": 5}, None, "distill.teacher_cache: not used"),
    ({"student_fraction": 0.5}, None, "distill.student_fraction: not used by distill.mode=logit"),
    ({"teacher_cache": "topk"}, None, "teacher_cache=topk needs distill.topk"),
    ({"jsd_beta": 0.3}, None, "jsd_beta is used only with distill.loss=jsd"),
    ({"teacher_batch_size": 8}, None, "distill.teacher_batch_size is used only with distill.teacher_cache=topk"),
    ({"hard_weight": 1.0}, None, "never uses the teacher; use method sft"),
    ({"mode": "sequence", "disable_dropout": False}, "prompt", "distill.disable_dropout: not used by distill.mode="),
    ({}, "prompt", "distill.mode=logit scores the data's responses"),
    ({"mode": "sequence"}, "messages", "every data file (train and eval) must have format prompt"),
    ({"mode": "on_policy", "student_fraction": 0.5}, "prompt", "prompt rows have none"),
])
def test_impossible_settings_are_refused_with_the_fix(distill, data, message):
    raw = {"model": {"name_or_path": "student"}, "method": "distill", "output_dir": "out",
           "data": {"train": [{"path": "rows.jsonl", "format": data or "messages"}]},
           "distill": {"teacher": "teacher", **distill}}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, raw=raw)


def test_on_policy_refuses_packing_and_accepts_the_mix_with_data_responses():
    raw = {"model": {"name_or_path": "student"}, "method": "distill", "output_dir": "out",
           "data": {"train": "rows.jsonl", "packing": True},
           "distill": {"teacher": "teacher", "mode": "on_policy", "student_fraction": 0.5}}
    with pytest.raises(ConfigError, match="data.packing=true cannot be used with distill.mode=on_policy"):
        load_config(None, raw=raw)
    raw["data"]["packing"] = False
    assert load_config(None, raw=raw).distill.student_fraction == 0.5


def test_a_written_config_loads_again():
    from posttrain.config import _load_yaml, dump_config

    for mode, data in (("logit", "messages"), ("sequence", "prompt"), ("on_policy", "prompt")):
        raw = {"model": {"name_or_path": "student"}, "method": "distill", "output_dir": "out",
               "data": {"train": [{"path": "rows.jsonl", "format": data}]}, "distill": {"teacher": "t", "mode": mode}}
        cfg = load_config(None, raw=raw)
        assert load_config(None, raw=_load_yaml(dump_config(cfg))) == cfg


def test_tokenizer_difference_names_what_differs(tokenizer):
    assert tokenizer_difference(tokenizer, tokenizer) is None
    assert special_token_difference(tokenizer, tokenizer) is None
    other = SimpleNamespace(get_vocab=lambda: {**tokenizer.get_vocab(), "zzz-new": len(tokenizer)},
                            all_special_tokens=tokenizer.all_special_tokens, eos_token=tokenizer.eos_token)
    assert "1025 (teacher)" in tokenizer_difference(tokenizer, other)
    swapped = dict(tokenizer.get_vocab())
    a, b = sorted(swapped)[300:302]
    swapped[a], swapped[b] = swapped[b], swapped[a]
    other.get_vocab = lambda: swapped
    assert "2 tokens have other ids" in tokenizer_difference(tokenizer, other)
    # The same ids with another end-of-sequence token (an instruct teacher, a base student): a warning only.
    other.get_vocab, other.eos_token = tokenizer.get_vocab, "<|im_end|>"
    assert tokenizer_difference(tokenizer, other) is None
    assert "end-of-sequence" in special_token_difference(tokenizer, other)


def test_a_teacher_that_cannot_be_loaded_is_named_as_distill_teacher(tmp_path, tokenizer, monkeypatch):
    from posttrain.trainers import distill

    cfg = config()
    cfg.distill.teacher = str(tmp_path / "no-such-teacher")
    with pytest.raises(PosttrainError) as err:
        check_shared_tokenizer(cfg, tokenizer)
    assert f"distill.teacher={cfg.distill.teacher!r}" in str(err.value) and "model.name_or_path" not in str(err.value)
    with pytest.raises(PosttrainError, match="^distill.teacher="):
        distill.load_teacher(cfg, torch.device("cpu"))
    # Same ids, other special tokens: trained with a warning that names the teacher.
    theirs = SimpleNamespace(get_vocab=tokenizer.get_vocab, all_special_tokens=tokenizer.all_special_tokens,
                             eos_token="<|im_end|>")
    monkeypatch.setattr("posttrain.models.load.load_tokenizer", lambda _: theirs)
    said = []
    check_shared_tokenizer(cfg, tokenizer, said.append)
    assert len(said) == 1 and said[0].startswith("warning: distill.teacher=") and "end-of-sequence" in said[0]


class ScriptedEngine:
    """A generation engine that answers each prompt with a given completion and records what it was asked."""

    def __init__(self, answers: dict[tuple, list[int]]):
        self.answers, self.asked = answers, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        from posttrain.generation.base import Generation

        self.asked += [list(p) for p in prompts]
        answers = [self.answers[tuple(p)] for p in prompts]
        return [[Generation(i, a, [0.0] * len(a), " ".join(map(str, a)), "stop")] for i, a in enumerate(answers)]


def test_an_on_policy_step_trains_on_prompt_plus_the_students_sample_with_the_prompt_masked(tmp_path, model,
                                                                                           tokenizer):
    import copy

    from accelerate import Accelerator

    from posttrain.data.dataset import TokenizedSet
    from posttrain.trainers.distill import OnPolicyDistillTrainer

    # Two token rows (prompt, then the data's response 90, 91 / 92); data.max_seq_len = 8.
    prompts = [[1, 10, 11, 12], [1, 13, 14, 15, 16, 17]]
    ids = [prompts[0] + [90, 91], prompts[1] + [92]]
    labels = [[IGNORE] * 4 + [90, 91], [IGNORE] * 6 + [92]]
    data = TokenizedSet([np.array(x, np.int32) for x in ids], [np.array(x, np.int32) for x in labels], [[0], [1]])
    # The second sample is longer than the 2 tokens its prompt leaves free: it is cut to fit.
    engine = ScriptedEngine({tuple(prompts[0]): [30, 31, 32], tuple(prompts[1]): [40, 41, 42]})
    raw = {"model": {"name_or_path": "student"}, "method": "distill", "output_dir": str(tmp_path),
           "data": {"train": "rows.jsonl", "max_seq_len": 8}, "training": {"batch_size": 2, "progress_bar": False},
           "distill": {"teacher": "t", "mode": "on_policy", "generation": {"max_new_tokens": 3}}}
    cfg = load_config(None, raw=raw)
    trainer = OnPolicyDistillTrainer(cfg, Accelerator(cpu=True), copy.deepcopy(model), tokenizer,
                                     DistillMethod(0, cfg), data, None, engine=engine, log=lambda *a: None)
    (batch,) = trainer._micro_batches([0, 1])
    assert sorted(engine.asked) == sorted(prompts)  # the prompts alone, never the data's responses
    expected = {0: (prompts[0] + [30, 31, 32], [IGNORE] * 4 + [30, 31, 32]),
                1: (prompts[1] + [40, 41], [IGNORE] * 6 + [40, 41])}
    for r in range(2):
        n = int(batch["attention_mask"][r].sum())
        got_ids = batch["input_ids"][r, :n].tolist()
        row = 0 if got_ids[:4] == prompts[0] and n == 7 else 1
        assert (got_ids, batch["labels"][r, :n].tolist()) == expected[row]
    assert trainer.rollout_stats == {"on_policy": 1.0, "response_length": 2.5}


def test_sequence_mode_with_vllm_leaves_the_teacher_to_vllm_and_hashes_its_files(tmp_path, tiny_model, tokenizer,
                                                                                 monkeypatch):
    import json
    import shutil

    from posttrain.data.prompts import PromptSet
    from posttrain.trainers import distill

    prompts = PromptSet([np.array([1, 10, 11], np.int32)],
                        [{"prompt": [{"role": "user", "content": "q"}], "reference": None, "source": "p.jsonl:1"}])
    made = {}

    def make_engine(kind, model, tok, **kw):
        made.update(kind=kind, model=model, path=kw["model_path"])
        return ScriptedEngine({(1, 10, 11): [7]})

    monkeypatch.setattr("posttrain.generation.resolve_engine", lambda requested, vllm_can_load=True: "vllm")
    monkeypatch.setattr("posttrain.generation.make_engine", make_engine)
    monkeypatch.setattr(distill, "load_teacher", lambda *a: pytest.fail("the teacher was loaded in torch as well"))
    raw = {"model": {"name_or_path": str(tiny_model)}, "method": "distill", "output_dir": str(tmp_path),
           "data": {"train": [{"path": "p.jsonl", "format": "prompt"}]},
           "distill": {"teacher": str(tiny_model), "mode": "sequence"}}
    cfg = load_config(None, raw=raw)
    acc = SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, device=torch.device("cpu"))
    saved = tmp_path / "provenance.json"
    distill._write_teacher_responses(cfg, acc, tokenizer, {"train": prompts}, {"train": tmp_path / "t.jsonl"}, {},
                                     saved, lambda *a: None)
    assert made == {"kind": "vllm", "model": None, "path": str(tiny_model)}
    info = json.loads(saved.read_text())
    assert "teacher_weights" not in info and info["teacher_files"] == distill.files_fingerprint(str(tiny_model))
    # The hash follows the weight files' bytes.
    moved = shutil.copytree(tiny_model, tmp_path / "moved")
    weights = next(moved.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert distill.files_fingerprint(str(moved)) != info["teacher_files"] is not None
