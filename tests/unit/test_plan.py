"""The planner: its memory formulas on hand-computed cases and against the tensors a real forward keeps, what
each mode trains on an empty (meta) model, the recommendation rules, --data lengths and the command line.

Predicted against measured peaks of real training steps: tests/integration/test_plan_accuracy.py.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.config import TuningConfig
from posttrain.errors import ConfigError, PosttrainError
from posttrain.plan.memory import (
    NF4_BYTES,
    Estimate,
    Settings,
    activation_bytes,
    estimate,
    logits_bytes,
    parse_size,
    weight_bytes,
)
from posttrain.plan.planner import make_plan, plan_request
from posttrain.plan.recommend import recommend
from posttrain.plan.shape import (
    PLAN_MODES,
    Architecture,
    ModeShape,
    architecture,
    empty_model,
    mode_shape,
    read_config,
)

GiB = 1024**3
CPU = {"mixed_precision": "no", "device": "cpu"}

# One Llama-style block: hidden 4, gated MLP of 8, 2 query heads and 1 key/value head of size 2, vocab 10, tied.
# Parameters: embedding 10x4 = 40; q 16, k 8, v 8, o 16, gate 32, up 32, down 32 (144 in projections);
# two norms 8, final norm 4: 196.
ONE_BLOCK = Architecture(name="hand", model_type="llama", layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1,
                         head_dim=2, vocab=10, tied_embeddings=True, gated_mlp=True, params=196,
                         layer_linear_params=144)
FULL = ModeShape("full", trainable=196, total=196, largest=40, first_trained_layer=0, weight_layers=1,
                 embeddings_trained=True, head_trained=True, final_norm_trained=True)


# --- sizes -------------------------------------------------------------------------------------------------


def test_memory_sizes_parse():
    assert parse_size("24GiB") == 24 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("80G") == 80 * GiB  # as nvidia-smi prints it
    assert parse_size(" 1.5 gib ") == int(1.5 * GiB)
    assert parse_size("16384MiB") == 16 * GiB
    for bad in ("lots", "24 GiBs", "-3GB", "0GB", ""):
        with pytest.raises(PosttrainError, match="--gpu-memory"):
            parse_size(bad)


# --- formulas by hand -----------------------------------------------------------------------------------------


def test_full_fine_tuning_step_by_hand():
    s = Settings(seq_len=3, batch_size=2, **CPU)  # 6 tokens, everything in fp32
    per_token = {  # bytes one token leaves for backward, tensor by tensor
        "block input x and its 1/rms (the norm's square and product keep them)": 4 * 4 + 4,
        "x * 1/rms (the norm weight's gradient)": 4 * 4,
        "norm output (input of q, k and v)": 4 * 4,
        "q after rotary": 4 * 4,
        "k after rotary": 4 * 2,
        "v": 4 * 2,
        "attention output (also o_proj's input)": 4 * 4,
        "attention log-sum-exp, one per head": 4 * 2,
        "residual before the MLP norm and its 1/rms": 4 * 4 + 4,
        "its x * 1/rms": 4 * 4,
        "its output (input of gate and up)": 4 * 4,
        "gate, up and silu(gate)": 3 * 4 * 8,
        "silu(gate) * up (down's input)": 4 * 8,
        "final norm: input, 1/rms, x * 1/rms, output (the LM head's input)": 4 * 4 + 4 + 4 * 4 + 4 * 4,
        "rotary cos and sin": 2 * 4 * 2,
    }
    acts = activation_bytes(ONE_BLOCK, FULL, s)
    assert acts.stored == 6 * sum(per_token.values()) == 2136
    # With checkpointing the block keeps its input (16 B a token) and backward recomputes the rest (288 B).
    assert acts.checkpoint_stored == 6 * (16 + 52 + 16)
    assert acts.checkpoint_recompute == 6 * 288
    # The chunked head's backward on the 2 x 2 scored rows: recomputed logits, their difference from the
    # log-sum-exp, its exponential and the gradient, fp32. Full logits: 6 x 10 logits, their gradient and two
    # fp32 temporaries of one chunk (here all 6 rows).
    assert logits_bytes(ONE_BLOCK, FULL, s) == 4 * 4 * (2 * 2) * 10
    assert logits_bytes(ONE_BLOCK, FULL, replace(s, chunked_head=False)) == 2 * 4 * 6 * 10 + 2 * 4 * 6 * 10

    e = estimate(ONE_BLOCK, FULL, s)
    assert (e.weights, e.gradients, e.optimizer) == (4 * 196, 4 * 196, 2 * 4 * 196)
    assert e.optimizer_scratch == 2 * 4 * 40  # CPU AdamW: sqrt and quotient of the largest tensor (the embedding)
    assert e.autocast_copies == 0
    assert e.total == 784 + 1568 + max(2136 + 640, 784 + 320)
    stored, recompute = 6 * 84, 6 * 288
    assert e.total_checkpointed == 784 + 1568 + max(stored + max(640, recompute), 784 + max(320, recompute))


def test_gpu_weights_by_hand():
    gpu = Settings(seq_len=3, batch_size=2, mixed_precision="bf16", device="cuda")
    # Full fine-tuning keeps fp32 master weights; autocast caches a bf16 copy of every projection and the head.
    e = estimate(ONE_BLOCK, FULL, gpu)
    assert e.weights == 4 * 196 and e.autocast_copies == 2 * (144 + 40)
    assert e.optimizer_scratch == 4 * 196  # CUDA AdamW (foreach): sqrt of every second moment at once
    # LoRA on a GPU: posttrain loads the base in bf16; the adapters (here 20 parameters) stay fp32.
    lora = ModeShape("lora", trainable=20, total=216, largest=8, first_trained_layer=0, adapter_layers=1)
    assert weight_bytes(ONE_BLOCK, lora, gpu) == 2 * 196 + 4 * 20
    # QLoRA: NF4 projections (4 bits + double-quantised absmax), every other parameter cast to fp32.
    qlora = ModeShape("qlora", trainable=20, total=216, largest=8, first_trained_layer=0, adapter_layers=1)
    assert weight_bytes(ONE_BLOCK, qlora, gpu) == round(144 * NF4_BYTES + 4 * (196 - 144) + 4 * 20)
    assert NF4_BYTES == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))


def test_qlora_residual_stream_is_fp32():
    # prepare_model_for_kbit_training casts embeddings and norms to fp32, so the residual stream a checkpointed
    # block keeps and the final norm's output (the chunked head's input) are fp32, unlike LoRA's bf16 base.
    gpu = Settings(seq_len=3, batch_size=2, mixed_precision="bf16", device="cuda")
    shape = {"trainable": 20, "total": 216, "largest": 8, "first_trained_layer": 0, "adapter_layers": 1}
    final_norm, rope = 4 * 4 + 4, 2 * 2 * 4
    qlora = activation_bytes(ONE_BLOCK, ModeShape("qlora", **shape), gpu)
    assert qlora.checkpoint_stored == 6 * (4 * 4 + final_norm + 4 * 4 + rope)
    lora = activation_bytes(ONE_BLOCK, ModeShape("lora", **shape), gpu)
    assert lora.checkpoint_stored == 6 * (2 * 4 + final_norm + 2 * 4 + rope)


def test_data_parallel_adds_ddp_gradient_buckets():
    # accelerate's DDP (gradient_as_bucket_view off) keeps a flat fp32 copy of every trained gradient on each GPU.
    s = Settings(seq_len=3, batch_size=2, **CPU)
    one, two = estimate(ONE_BLOCK, FULL, s), estimate(ONE_BLOCK, FULL, replace(s, gpus=2))
    assert one.ddp_buckets == 0 and two.ddp_buckets == 4 * 196
    assert (two.total - one.total, two.total_checkpointed - one.total_checkpointed) == (4 * 196, 4 * 196)


# --- what each mode trains, counted on the empty model ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_meta(tiny_model):
    config = read_config(str(tiny_model))
    model = empty_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    return architecture(model, config, str(tiny_model)), model


def _tuning(mode: str) -> TuningConfig:
    if mode == "dora":
        return TuningConfig(mode="lora", lora={"use_dora": True})
    return TuningConfig(mode=mode, freeze={"train_top_layers": 1})


def test_tiny_model_shape(tiny_meta):
    arch, _ = tiny_meta
    assert (arch.layers, arch.hidden, arch.intermediate, arch.heads, arch.kv_heads, arch.head_dim) == (2, 64, 256, 4, 2,
                                                                                                      16)
    assert arch.tied_embeddings and arch.gated_mlp and arch.vocab == 1024
    # 2 x (q 4096 + k 2048 + v 2048 + o 4096 + gate/up/down 3 x 16384) = 122880; + embedding 65536 + norms 320.
    assert arch.layer_linear_params == 122880 and arch.params == 122880 + 65536 + 5 * 64


def test_lora_adapters_by_hand(tiny_meta):
    _, model = tiny_meta
    ms = mode_shape(model, "lora", _tuning("lora"))
    # Rank 8 on q (64->64), k, v (64->32), o (64->64), gate, up (64->256), down (256->64): A r x in, B out x r.
    per_block = sum(8 * i + o * 8 for i, o in ((64, 64), (64, 32), (64, 32), (64, 64), (64, 256), (64, 256), (256, 64)))
    assert ms.trainable == 2 * per_block
    # Dropout 0.05 keeps each target's dropped-out input and its mask; B keeps A's rank-8 output.
    inputs = 6 * 64 + 256
    assert (ms.adapter_saved, ms.adapter_masks) == (inputs + 7 * 8, inputs)
    dora = mode_shape(model, "dora", _tuning("dora"))
    assert dora.adapter_saved == ms.adapter_saved + 2 * (64 + 32 + 32 + 64 + 256 + 256 + 64)
    assert dora.transient == 256 * 256 + 3 * 256 * 64  # down_proj's identity, B @ A, its scaled copy, the sum
    ia3 = mode_shape(model, "ia3", _tuning("ia3"))
    # peft's Llama default: k and v outputs (32 each) scaled, down_proj's input (256) scaled.
    assert ia3.trainable == 2 * (32 + 32 + 256) and ia3.adapter_saved == 32 + 32 + 256


@pytest.mark.parametrize("mode", [m for m in PLAN_MODES if m not in ("qlora", "bitfit")])
def test_trainable_counts_match_a_real_model(tiny_model, tiny_meta, mode):
    from transformers import AutoModelForCausalLM

    from posttrain.tuning import apply_tuning, count_parameters

    _, model = tiny_meta
    real = apply_tuning(AutoModelForCausalLM.from_pretrained(tiny_model), _tuning(mode))
    ms = mode_shape(model, mode, _tuning(mode))
    assert (ms.trainable, ms.total) == count_parameters(real)


def test_bitfit_is_unavailable_without_biases(tiny_meta):
    _, model = tiny_meta
    assert "no bias parameters" in mode_shape(model, "bitfit", _tuning("bitfit")).unavailable


@pytest.mark.parametrize("mode", ["full", "freeze", "lora", "dora", "ia3", "prompt", "ptuning", "prefix", "ptuning_v2",
                                  "bottleneck"])
def test_activations_match_what_autograd_keeps(tiny_model, tiny_meta, mode):
    """The activation term against the storages a real forward + loss hands to autograd (parameters excluded)."""
    from transformers import AutoModelForCausalLM

    from posttrain.losses.nll import nll_sum
    from posttrain.tuning import apply_tuning

    arch, meta = tiny_meta
    b, s = 4, 64
    full_logits = Settings(s, b, chunked_head=False, **CPU)  # as this forward: whole logits, then the loss
    predicted = activation_bytes(arch, mode_shape(meta, mode, _tuning(mode)), full_logits).stored
    torch.manual_seed(0)
    model = apply_tuning(AutoModelForCausalLM.from_pretrained(tiny_model), _tuning(mode)).train()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            kept[storage._cdata] = storage.nbytes()
        return t

    ids = torch.randint(4, arch.vocab, (b, s), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(s).expand(b, s),
                       use_cache=False).logits
        nll_sum(logits, ids)
    log_softmax = 4 * b * (s - 1) * arch.vocab  # counted in the logits term
    measured = sum(kept.values()) - log_softmax
    assert predicted == pytest.approx(measured, rel=0.1), (mode, predicted, measured)


# --- recommendation rules ---------------------------------------------------------------------------------------


def _config_dir(tmp_path: Path, name: str, **sizes) -> str:
    from transformers import LlamaConfig

    LlamaConfig(**sizes).save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def llama_8b(tmp_path) -> str:
    return _config_dir(tmp_path, "llama-8b", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       tie_word_embeddings=False)


def test_8b_on_24gib_recommends_qlora_for_a_batch_of_long_sequences(tmp_path):
    plan = make_plan(plan_request({"model": llama_8b(tmp_path), "gpu_memory": "24GiB", "seq_len": 4096,
                                   "batch_size": 4}), modes=("full", "lora", "qlora"))
    assert 8.0e9 < plan.architecture.params < 8.1e9  # Llama-3-8B's 8.03B, counted on the meta device
    e = plan.estimates
    assert e["full"].total > 100 * GiB  # fp32 weights, gradients and AdamW: 16 bytes a parameter
    assert e["lora"].total_checkpointed > 0.9 * 24 * GiB >= e["qlora"].total_checkpointed
    rec = plan.recommendation
    assert rec.mode == "qlora" and rec.steps[0].what == "tune with QLoRA with gradient checkpointing"
    assert "gradient_checkpointing" in rec.notes[0]
    assert recommend(plan.architecture.params, 80 * GiB, e).mode == "lora"  # full still needs ~150 GiB
    assert recommend(plan.architecture.params, 12 * GiB, e).mode is None
    # One sequence of 2048 tokens: LoRA over the bf16 base fits with checkpointing (the head runs in chunks).
    short = make_plan(plan_request({"model": llama_8b(tmp_path), "gpu_memory": "24GiB"}), modes=("full", "lora"))
    assert short.recommendation.mode == "lora" and short.estimates["lora"].total_checkpointed < 20 * GiB


def test_half_billion_on_80gib_recommends_full_with_a_task_mix(tmp_path):
    qwen_05b = _config_dir(tmp_path, "qwen-0.5b", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    plan = make_plan(plan_request({"model": qwen_05b, "gpu_memory": "80GiB"}), modes=("full", "lora", "qlora"))
    assert plan.settings.seq_len == 2048 and plan.seq_len_source == "default"
    steps = plan.recommendation.steps
    assert plan.recommendation.mode == "full" and steps[0].what == "tune with full fine-tuning"
    assert "multi-task" in steps[1].what
    # Full logits of a 152k vocabulary (bf16, their gradient, two fp32 chunks) cost more than the chunked head.
    full_logits = logits_bytes(plan.architecture, FULL, replace(plan.settings, chunked_head=False))
    assert full_logits == 2 * 2 * 2048 * 151936 + 2 * 4 * (2**24 // 151936) * 151936
    assert plan.estimates["full"].logits == 18 * (2**26 // 151936) * 151936 < full_logits


def _est(mode: str, total: float, checkpointed: float) -> Estimate:
    return Estimate(mode, 0, 0, 0, 0, 0, 0, 0, 0, int(total * GiB), int(checkpointed * GiB), 1)


def test_preference_goal_chooses_the_mode_at_twice_the_batch():
    single = {"full": _est("full", 90, 80), "lora": _est("lora", 30, 20), "qlora": _est("qlora", 20, 12)}
    pairs = {"full": _est("full", 95, 85), "lora": _est("lora", 40, 23), "qlora": _est("qlora", 30, 16)}
    assert recommend(8e9, 24 * GiB, single, goal="instruction").mode == "lora"
    rec = recommend(8e9, 24 * GiB, single, goal="preference", pair_estimates=pairs)
    assert rec.mode == "qlora"
    assert [s.what for s in rec.steps] == ["tune with QLoRA with gradient checkpointing",
                                           "then SFT (QLoRA) on instruction data",
                                           "then DPO (QLoRA) on preference pairs"]


def test_goals_private_data_and_nothing_fitting():
    fits = {"full": _est("full", 10, 8), "lora": _est("lora", 5, 4), "qlora": _est("qlora", 4, 3)}
    assert [s.what for s in recommend(5e8, 80 * GiB, fits, goal="domain").steps][1:] == [
        "then continued pretraining (full) on domain text", "then SFT (full) on instruction data"]
    assert "GRPO" in recommend(5e8, 80 * GiB, fits, goal="reasoning").steps[2].what
    private = recommend(5e8, 80 * GiB, fits, private=True, adapter_bytes=4 * 2**20)
    whats = [s.what for s in private.steps]
    assert any("one owner" in w and "device" in w for w in whats)
    assert any("federated LoRA" in w for w in whats)
    assert "4.0 MiB" in private.steps[-1].why  # only the adapter travels
    none = recommend(70e9, 24 * GiB, {m: _est(m, 200, 150 if m != "qlora" else 40) for m in fits}, batch_size=4)
    assert none.mode is None and none.steps[0].what == "no tuning mode fits"
    assert "QLoRA with checkpointing" in none.steps[0].why and "lower --batch-size" in none.steps[0].why


# --- data lengths -------------------------------------------------------------------------------------------------


def test_data_lengths_choose_the_sequence_length(tiny_model, task_data, tokenizer):
    plan = make_plan(plan_request({"model": str(tiny_model), "gpu_memory": "8GiB", "data": str(task_data["train"]),
                                   "device": "cpu"}), modes=("full", "lora"))
    rows = [json.loads(x) for x in Path(task_data["train"]).read_text().splitlines() if x.strip()]
    expected = sorted(len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                    add_special_tokens=False)["input_ids"]) for r in rows)
    ln = plan.lengths
    assert ln.format == "messages" and ln.rows == len(rows) and ln.dropped == 0
    assert (ln.min, ln.max) == (expected[0], expected[-1])
    assert ln.p50 == expected[(len(expected) + 1) // 2 - 1]
    assert ln.suggested_seq_len % 64 == 0 and ln.suggested_seq_len >= ln.p99
    assert ln.longer == sum(1 for n in expected if n > ln.suggested_seq_len)
    assert plan.settings.seq_len == ln.seq_len == ln.suggested_seq_len
    # An explicit --seq-len wins; the distribution is still reported, against that length.
    short = make_plan(plan_request({"model": str(tiny_model), "gpu_memory": "8GiB", "data": str(task_data["train"]),
                                    "seq_len": expected[len(expected) // 2], "device": "cpu"}), modes=("lora",))
    assert short.settings.seq_len == short.lengths.seq_len == expected[len(expected) // 2]
    assert short.lengths.longer == sum(1 for n in expected if n > expected[len(expected) // 2])


# --- command line ---------------------------------------------------------------------------------------------------


def test_cli_text_and_json(tiny_model, capsys):
    args = ["plan", "--model", str(tiny_model), "--gpu-memory", "1GiB", "--device", "cpu", "--mixed-precision", "no",
            "--seq-len", "64", "--batch-size", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "recommended path:" in text and "1. tune with full fine-tuning" in text
    for mode in PLAN_MODES:
        assert f"\n{mode} " in text
    assert "qlora" in text and "QLoRA needs a CUDA GPU" in text
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["mode"] for m in data["modes"]] == list(PLAN_MODES)
    full = next(m for m in data["modes"] if m["mode"] == "full")
    assert full["fits"] is True and full["total"] == full["weights"] + full["optimizer"] + max(
        full["activations"] + full["logits"] + full["autocast_copies"], full["gradients"] + full["optimizer_scratch"])
    assert data["recommendation"]["mode"] == "full" and data["settings"]["seq_len"] == 64


def test_cli_errors_are_one_line(tmp_path, tiny_model, capsys):
    assert main(["plan", "--model", str(tiny_model), "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--gpu-memory 'lots' is not a memory size" in err and "Traceback" not in err
    assert main(["plan", "--model", str(tmp_path / "missing"), "--gpu-memory", "24GiB"]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--gpus: given 0"):
        plan_request({"model": "m", "gpu_memory": "8GiB", "gpus": 0})
    with pytest.raises(ConfigError, match="--data-format describes --data"):
        plan_request({"model": "m", "gpu_memory": "8GiB", "data_format": "messages"})
