"""MoE router losses under accumulation: with global-batch expert loads, 2 accumulated batches of 2 equal 1 of 4;
the z-loss does in either scope."""

import pytest
import torch

from tests.conftest import base_config, metrics, run

MOE = {"aux_loss_coef": 0.5, "z_loss_coef": 0.05}


def _one_step(model, method, micro: list[dict]) -> tuple[float, float, float, dict[str, torch.Tensor]]:
    """(loss, aux loss, z-loss, gradients) of one step as the loop computes it: sums over micro-batches / units."""
    model.zero_grad(set_to_none=True)
    units = float(sum(method.count(b) for b in micro))
    method.prepare_step(model, micro, lambda values: values)
    loss_sum = aux_sum = z_sum = 0.0
    for batch in micro:
        loss, metrics = method.loss(model, batch)
        (loss / units).backward()
        loss_sum += float(loss.detach())
        aux_sum += metrics["moe/aux_loss"]
        z_sum += metrics["moe/z_loss"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss_sum / units, aux_sum / units, z_sum / units, grads


@pytest.mark.parametrize("scope", ["global_batch", "micro_batch"])
def test_one_batch_of_4_equals_2_accumulated_batches_of_2(tiny_moe, scope):
    from transformers import AutoModelForCausalLM

    from posttrain.config import MoeConfig
    from posttrain.models.moe import RouterRecorder, moe_spec
    from posttrain.trainers.moe import MoeMethod
    from posttrain.trainers.supervised import SupervisedMethod

    model = AutoModelForCausalLM.from_pretrained(tiny_moe)
    model.train()
    pad = model.config.pad_token_id
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length in (14, 11, 9, 5):  # unequal: each micro-batch pads differently and holds different token counts
        ids = torch.randint(4, 500, (length,), generator=gen).tolist()
        rows.append([(ids, ids)])
    method = MoeMethod(SupervisedMethod(pad), RouterRecorder(model, pad), moe_spec(model.config),
                       MoeConfig(aux_loss_scope=scope, **MOE), MOE["aux_loss_coef"])
    one = _one_step(model, method, [method.collate(rows)])
    two = _one_step(model, method, [method.collate(rows[:2]), method.collate(rows[2:])])
    # The z-loss is a mean over the global batch's tokens in both scopes.
    assert two[2] == pytest.approx(one[2], rel=1e-6)
    if scope == "global_batch":
        assert two[0] == pytest.approx(one[0], rel=1e-6)
        assert two[1] == pytest.approx(one[1], rel=1e-6)
        for name, grad in one[3].items():
            torch.testing.assert_close(two[3][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    else:
        # Each micro-batch balances its own tokens: a product of two means does not split over micro-batches.
        assert two[1] != pytest.approx(one[1], rel=1e-4)


def test_global_batch_scope_in_the_loop(tmp_path, tiny_moe, task_data):
    def config(name, batch_size, accumulation, scope):
        training = {"max_steps": 3, "learning_rate": 3e-3, "batch_size": batch_size,
                    "gradient_accumulation_steps": accumulation}
        return base_config(tiny_moe, task_data["train"], tmp_path / name, training=training,
                           moe={**MOE, "aux_loss_scope": scope})

    def logged(final, key):
        return [m[key] for m in metrics(final.parent) if key in m]

    one = run(config("one", 4, 1, "global_batch"))
    two = run(config("two", 2, 2, "global_batch"))
    assert len(logged(one, "loss")) == len(logged(one, "moe/aux_loss")) == 3
    assert logged(two, "loss") == pytest.approx(logged(one, "loss"), rel=1e-5)
    assert logged(two, "moe/aux_loss") == pytest.approx(logged(one, "moe/aux_loss"), rel=1e-5)
    assert logged(two, "moe/z_loss") == pytest.approx(logged(one, "moe/z_loss"), rel=1e-5)
    micro = run(config("micro", 2, 2, "micro_batch"))
    assert len(logged(micro, "moe/aux_loss")) == 3
    assert logged(micro, "moe/aux_loss")[0] != pytest.approx(logged(one, "moe/aux_loss")[0], rel=1e-4)
    # the first step starts from the same weights: the z-loss does not depend on the scope or the split
    assert logged(micro, "moe/z_loss")[0] == pytest.approx(logged(one, "moe/z_loss")[0], rel=1e-5)
