"""Acceptance of ``posttrain plan``: the predicted peak memory of a training step is within 25% of the peak
measured on CPU (live tensor bytes, ``posttrain.plan.measure``) over real steps of posttrain's Trainer, for
full, LoRA and freeze tuning, on the tiny model and on a ~48M-parameter model built locally.

The same comparison for every mode, printed: ``python benchmarks/plan_accuracy.py``.
"""

import pytest

from posttrain.config import TuningConfig
from posttrain.plan.measure import measure_training_steps
from posttrain.plan.memory import Settings, estimate
from posttrain.plan.shape import architecture, empty_model, mode_shape, read_config

TOLERANCE = 0.25
MODES = {"full": TuningConfig(mode="full"), "lora": TuningConfig(mode="lora"),
         "freeze": TuningConfig(mode="freeze", freeze={"train_top_layers": 1})}


@pytest.fixture(scope="module")
def model_48m(tmp_path_factory):
    from posttrain.models.tiny import build_tiny_model

    # 12 blocks of hidden 512 (MLP 2048, 8 query and 4 key/value heads), vocab 1024, tied: 47.7M parameters.
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama-48m", layers=12, hidden=512, heads=8, kv_heads=4)


def predicted(model_dir, tuning: TuningConfig, settings: Settings, checkpointing: bool) -> tuple[int, int]:
    config = read_config(str(model_dir))
    meta = empty_model(config)
    ms = mode_shape(meta, tuning.mode, tuning)
    e = estimate(architecture(meta, config, str(model_dir)), ms, settings)
    return (e.total_checkpointed if checkpointing else e.total), ms.trainable


def check(model_dir, mode: str, seq_len: int, batch_size: int, checkpointing: bool = False,
          chunked_head: bool = True) -> float:
    tuning = MODES[mode]
    settings = Settings(seq_len, batch_size, mixed_precision="no", device="cpu", chunked_head=chunked_head)
    want, trainable = predicted(model_dir, tuning, settings, checkpointing)
    got = measure_training_steps(model_dir, tuning, seq_len, batch_size, gradient_checkpointing=checkpointing,
                                 chunked_head=chunked_head)
    assert got.trainable == trainable  # the meta-device count is exactly what the run trains
    ratio = want / got.peak
    assert abs(ratio - 1) <= TOLERANCE, f"{mode}: predicted {want} bytes, measured {got.peak} ({ratio:.3f}x)"
    return ratio


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("mode", MODES)
def test_tiny_model(tiny_model, mode, checkpointing):
    # Activations and the loss's vocabulary-sized tensors dominate here: 4 x 64 tokens on 0.19M parameters.
    check(tiny_model, mode, seq_len=64, batch_size=4, checkpointing=checkpointing)


@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_with_full_logits(tiny_model, mode):
    check(tiny_model, mode, seq_len=64, batch_size=4, chunked_head=False)


@pytest.mark.parametrize("mode", MODES)
def test_48m_model(model_48m, mode):
    # Weights, gradients and AdamW states dominate full tuning; activations are about a fifth of LoRA's peak.
    check(model_48m, mode, seq_len=32, batch_size=2)
