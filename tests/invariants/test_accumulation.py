"""One global batch of 8 equals 4 accumulated micro-batches of 2: same losses, same weights."""

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import base_config, losses, run


def _weights(final):
    return load_file(str(final / "model.safetensors"))


@pytest.mark.parametrize("packing", [False, True])
def test_accumulated_equals_one_batch(tmp_path, tiny_model, task_data, packing):
    def config(name, batch_size, accumulation):
        training = {"max_steps": 5, "learning_rate": 3e-3, "batch_size": batch_size,
                    "gradient_accumulation_steps": accumulation}
        return base_config(tiny_model, task_data["train"], tmp_path / name, data={"packing": packing}, training=training)

    one = run(config("one", 8, 1))
    four = run(config("four", 2, 4))
    a, b = losses(one.parent), losses(four.parent)
    assert len(a) == 5
    assert a == pytest.approx(b, rel=1e-5)
    wa, wb = _weights(one), _weights(four)
    # Adam's near sign-like update can turn float noise in a ~0 gradient into ~1e-5; a normalisation
    # error would move every weight by about one learning rate (3e-3).
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-3, atol=1e-4)
    # The invariant is not vacuous: the micro-batches hold different numbers of trained tokens,
    # so averaging per micro-batch (the common mistake) would give a different loss.
    assert a[0] != pytest.approx(a[1])
