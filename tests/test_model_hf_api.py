"""Our classes as transformers models: transformers' own Longformer test expectations, run against
them, with transformers as the numerical reference (tiny configs built here).

Every head loads transformers' folders and gives its outputs to 1e-5 and the other way round;
outputs behave as transformers' (`[0]`, `to_tuple()`, `return_dict=False`); attentions and hidden
states as transformers returns them; inputs_embeds, position_ids, token_type_ids; resize,
mismatched sizes, num_labels -> id2label; every parameter has a gradient; checkpointing = plain.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers

import ds_longformer
from ds_longformer import LongformerConfig, LongformerForSequenceClassification
from tests.model_helpers import TINY, hf_twin, make_batch, tiny_config

SEP = 2
HEADS = ["LongformerModel", "LongformerForMaskedLM", "LongformerForSequenceClassification",
         "LongformerForQuestionAnswering", "LongformerForTokenClassification", "LongformerForMultipleChoice"]
OUTPUTS = {  # what each head returns, compared with transformers'
    "LongformerModel": ("last_hidden_state", "pooler_output"),
    "LongformerForMaskedLM": ("loss", "logits"),
    "LongformerForSequenceClassification": ("loss", "logits"),
    "LongformerForQuestionAnswering": ("loss", "start_logits", "end_logits"),
    "LongformerForTokenClassification": ("loss", "logits"),
    "LongformerForMultipleChoice": ("loss", "logits"),
}


def head_inputs(name: str, seed: int = 0) -> dict:
    """A padded batch of odd length (37, not a multiple of the windows: transformers pads it, we
    need not) with the labels of `name`; QA and multiple-choice inputs hold a question and three
    sep tokens (`q </s></s> context </s>`) and no global_attention_mask: the heads' defaults."""
    ids, am, gm = make_batch(2, 37, (37, 29), ([0, 6], [3]), seed=seed)
    inputs = dict(input_ids=ids, attention_mask=am, global_attention_mask=gm)
    g = torch.Generator().manual_seed(seed)
    if name == "LongformerForMaskedLM":
        inputs["labels"] = torch.where(am.bool() & (torch.rand(ids.shape, generator=g) < 0.3), ids, -100)
    elif name == "LongformerForSequenceClassification":
        inputs["labels"] = torch.tensor([2, 0])
    elif name == "LongformerForTokenClassification":
        inputs["labels"] = torch.where(am.bool(), torch.randint(0, 3, ids.shape, generator=g), -100)
    elif name == "LongformerForQuestionAnswering":
        for b, (question, end) in enumerate(((5, 36), (9, 28))):
            ids[b, [question, question + 1, end]] = SEP
        inputs.pop("global_attention_mask")
        inputs.update(start_positions=torch.tensor([12, 15]), end_positions=torch.tensor([14, 40]))  # 40: outside
    elif name == "LongformerForMultipleChoice":
        choices = torch.stack([ids, ids.roll(1, dims=0), ids.flip(0)], dim=1)  # (B, K=3, N)
        choices[:, :, [4, 5, 36]] = SEP
        inputs = dict(input_ids=choices, attention_mask=torch.ones_like(choices), labels=torch.tensor([1, 2]))
    return inputs


def build(name: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    num_labels = 2 if name == "LongformerForQuestionAnswering" else 3
    return getattr(ds_longformer, name)(tiny_config(attention_window=[8, 4], num_labels=num_labels,
                                                    initializer_range=0.1, **config)).eval()


def assert_same_outputs(ours, theirs, fields, atol=1e-5):
    for field in fields:
        a, b = getattr(ours, field), getattr(theirs, field)
        assert a.shape == b.shape, field
        assert (a - b).abs().max() < atol, (field, (a - b).abs().max())


# ---- what every transformers model is --------------------------------------------------------------
def test_config_is_transformers_config_with_its_defaults():
    ours, theirs = LongformerConfig(), transformers.LongformerConfig()
    assert isinstance(ours, transformers.LongformerConfig) and ours.model_type == "longformer"
    mine = ours.to_dict()
    for key, value in theirs.to_dict().items():
        expected = [value] * theirs.num_hidden_layers if key == "attention_window" else value
        assert mine[key] == expected, key
    assert (ours.layer_norm_eps, ours.type_vocab_size, ours.vocab_size) == (1e-12, 2, 30522)
    assert LongformerConfig(num_labels=4).id2label == {i: f"LABEL_{i}" for i in range(4)}


@pytest.mark.parametrize("name", HEADS)
def test_every_head_is_a_pretrained_model_and_matches_transformers_both_ways(name, tmp_path):
    """Shapes, loss and outputs of every head against transformers' class of the same name, on an
    odd length with padding and global tokens; its folder loads in transformers with no missing or
    unexpected keys and transformers' folder loads in ours the same way."""
    model = build(name)
    assert isinstance(model, transformers.PreTrainedModel)
    hf_cls = getattr(transformers, name)
    hf = hf_twin(model, tmp_path / "ours", hf_cls)
    inputs = head_inputs(name)
    with torch.no_grad():
        ours, theirs = model(**inputs), hf(**inputs)
    assert_same_outputs(ours, theirs, OUTPUTS[name])

    torch.manual_seed(1)
    hf = hf_cls(hf.config).eval()  # transformers' own weights, folder and loader
    hf.save_pretrained(tmp_path / "theirs")
    again, info = getattr(ds_longformer, name).from_pretrained(tmp_path / "theirs", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert isinstance(again.config, LongformerConfig) and not again.training
    with torch.no_grad():
        assert_same_outputs(again(**inputs), hf(**inputs), OUTPUTS[name])


@pytest.mark.parametrize("name", HEADS)
def test_outputs_index_as_tuples_and_return_dict_false(name):
    """model(...)[0], .to_tuple() and return_dict=False (also as the config's default) give the same
    tensors in transformers' order; a dict-style key too."""
    model = build(name)
    inputs = head_inputs(name)
    with torch.no_grad():
        out = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
        model.config.return_dict = False
        by_config = model(**inputs)
    assert isinstance(out, transformers.utils.ModelOutput) and isinstance(as_tuple, tuple)
    first = OUTPUTS[name][0]
    assert out[0] is out.to_tuple()[0] and out[first] is getattr(out, first)
    assert len(as_tuple) == len(out.to_tuple()) == len(by_config)
    for a, b, c in zip(out.to_tuple(), as_tuple, by_config):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_model_shapes_as_transformers_tests_them():
    """transformers' create_and_check_model / ..._with_global_attention_mask / ..._for_*: shapes."""
    B, N, C = 2, 37, TINY["hidden_size"]
    ids, am, gm = make_batch(B, N, (N, 20), ([0, 3], [1]))
    with torch.no_grad():
        out = build("LongformerModel")(ids, am, gm)
        assert out.last_hidden_state.shape == (B, N, C) and out.pooler_output.shape == (B, C)
        assert build("LongformerForMaskedLM")(ids).logits.shape == (B, N, TINY["vocab_size"])
        assert build("LongformerForSequenceClassification")(ids).logits.shape == (B, 3)
        assert build("LongformerForTokenClassification")(ids).logits.shape == (B, N, 3)
        qa = build("LongformerForQuestionAnswering")(**head_inputs("LongformerForQuestionAnswering"))
        assert qa.start_logits.shape == qa.end_logits.shape == (B, N)
        mc = build("LongformerForMultipleChoice")(**head_inputs("LongformerForMultipleChoice"))
        assert mc.logits.shape == (B, 3)


def test_attention_mask_determinism_and_both_ways_of_global_attention():
    """All-ones attention_mask == none; global attention from global_attention_mask == from
    attention_mask 2 (transformers' two conventions)."""
    model = build("LongformerModel")
    ids, _, gm = make_batch(2, 30, globals_=([0, 4], [7]))
    with torch.no_grad():
        plain = model(ids).last_hidden_state
        assert torch.equal(plain, model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state)
        by_global_mask = model(ids, global_attention_mask=gm).last_hidden_state
        by_value_2 = model(ids, attention_mask=1 + gm).last_hidden_state
    assert torch.equal(by_global_mask, by_value_2) and (by_global_mask - plain).abs().max() > 1e-3


def test_inputs_embeds_position_ids_and_token_type_ids_as_transformers(tmp_path):
    model = build("LongformerModel", type_vocab_size=2)
    hf = hf_twin(model, tmp_path, transformers.LongformerModel)
    ids, _, gm = make_batch(2, 21, globals_=([0], [2]))
    embeds = model.get_input_embeddings()(ids)
    types = (torch.arange(21) > 10).long().expand(2, 21)
    positions = torch.arange(5, 26).expand(2, 21)
    with torch.no_grad():
        by_ids = model(ids, global_attention_mask=gm).last_hidden_state
        by_embeds = model(inputs_embeds=embeds, global_attention_mask=gm).last_hidden_state
        assert (by_ids - by_embeds).abs().max() < 1e-6  # no padding: the same positions
        for extra in (dict(token_type_ids=types), dict(position_ids=positions), dict(inputs_embeds=embeds)):
            inputs = dict(global_attention_mask=gm, **extra)
            if "inputs_embeds" not in extra:
                inputs["input_ids"] = ids
            assert_same_outputs(model(**inputs), hf(**inputs), ["last_hidden_state"])
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=embeds)


# ---- attentions and hidden states ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["blocked", "dense", "flex"])
def test_attentions_and_hidden_states_as_transformers(backend, tmp_path):
    """Local attentions (B, H, N, G + window + 1) per layer, global attentions (B, H, N, G) and
    num_layers + 1 hidden states, equal to transformers' with any backend; not computed when not asked."""
    model = build("LongformerModel")
    hf = hf_twin(model, tmp_path, transformers.LongformerModel)
    model.set_attention_backend(backend)
    B, N, H, L = 2, 37, TINY["num_attention_heads"], TINY["num_hidden_layers"]
    ids, am, gm = make_batch(B, N, (N, 30), ([0, 6, 20], [3]))
    with torch.no_grad():
        plain = model(ids, am, gm)
        ours = model(ids, am, gm, output_attentions=True, output_hidden_states=True)
        theirs = hf(input_ids=ids, attention_mask=am, global_attention_mask=gm, output_attentions=True,
                    output_hidden_states=True)
    assert plain.attentions is plain.global_attentions is plain.hidden_states is None
    assert len(ours.hidden_states) == L + 1 and len(ours.attentions) == len(ours.global_attentions) == L
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        assert a.shape == b.shape == (B, N, TINY["hidden_size"]) and (a - b)[am.bool()].abs().max() < 1e-5
    for layer, window in enumerate([8, 4]):
        local, global_ = ours.attentions[layer], ours.global_attentions[layer]
        assert local.shape == theirs.attentions[layer].shape == (B, H, N, 3 + window + 1)
        assert (local - theirs.attentions[layer]).abs().max() < 1e-5
        assert global_.shape == (B, H, N, 3)
        hf_global = theirs.global_attentions[layer][:, :, :N]  # transformers' keeps its padding to the window
        used = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)  # example 1 has one global token
        assert (global_ - hf_global).permute(0, 3, 1, 2)[used].abs().max() < 1e-5
        assert not global_.permute(0, 3, 1, 2)[~used].any()
        assert torch.allclose(global_.sum(2).permute(0, 2, 1)[used], torch.ones(4, H))  # rows of probabilities


def test_local_attention_probabilities_in_chunks_equal_one_chunk():
    """The probabilities are computed `chunk` queries at a time (a window's worth of keys around
    each chunk): chunks of 5, 16 and the whole sequence agree, at the ends and around padding."""
    from ds_longformer import AttentionLayout
    from ds_longformer.attention.probabilities import local_probabilities

    _, am, gm = make_batch(2, 37, (37, 30), ([0, 6, 20], [3]))
    layout = AttentionLayout.build(am, gm)
    q, k = torch.randn(2, 37, 4, 8), torch.randn(2, 37, 4, 8)
    whole = local_probabilities(q, k, layout, 8, chunk=64)
    for chunk in (5, 16):
        torch.testing.assert_close(local_probabilities(q, k, layout, 8, chunk=chunk), whole, rtol=0, atol=1e-6)


def test_no_global_tokens_give_no_global_attentions():
    model = build("LongformerModel")
    ids, am, _ = make_batch(2, 20, (20, 15))
    out = model(ids, am, output_attentions=True)
    assert out.global_attentions is None and out.attentions[0].shape == (2, TINY["num_attention_heads"], 20, 9)


# ---- heads' default global attention ---------------------------------------------------------------
def test_question_answering_puts_global_attention_on_the_question():
    """Without global_attention_mask: every token before the first sep token, as transformers'; a
    question without a sep token is refused clearly."""
    model = build("LongformerForQuestionAnswering")
    inputs = head_inputs("LongformerForQuestionAnswering")
    question = torch.zeros(2, 37, dtype=torch.bool)
    question[0, :5], question[1, :9] = True, True
    with torch.no_grad():
        default = model(**inputs)
        explicit = model(**inputs, global_attention_mask=question.long())
        other = model(**inputs, global_attention_mask=torch.zeros(2, 37, dtype=torch.long))
    assert torch.equal(default.start_logits, explicit.start_logits)
    assert (default.start_logits - other.start_logits).abs().max() > 1e-4
    inputs["input_ids"] = inputs["input_ids"].clamp(min=3)
    with pytest.raises(ValueError, match="no sep token"):
        model(**inputs)


def test_question_answering_loss_takes_one_or_several_gold_spans_per_row():
    """Positions (B,) are transformers' rule (also (B, 1)); (B, K) padded with -100: the marginal
    likelihood of all the row's spans (-log of the softmax mass on them), rows without a target left out."""
    model = build("LongformerForQuestionAnswering")
    inputs = head_inputs("LongformerForQuestionAnswering")
    del inputs["start_positions"], inputs["end_positions"]
    with torch.no_grad():
        out = model(**inputs)
        one = model(**inputs, start_positions=torch.tensor([12, 15]), end_positions=torch.tensor([14, 30]))
        column = model(**inputs, start_positions=torch.tensor([[12], [15]]), end_positions=torch.tensor([[14], [30]]))
        padded = model(**inputs, start_positions=torch.tensor([[12, -100], [15, -100]]),
                       end_positions=torch.tensor([[14, -100], [30, -100]]))
        several = model(**inputs, start_positions=torch.tensor([[12, 20, 12], [15, -100, -100]]),
                        end_positions=torch.tensor([[14, 21, -100], [30, 33, -100]]))
        empty_row = model(**inputs, start_positions=torch.tensor([[12, 20], [-100, -100]]),
                          end_positions=torch.tensor([[14, 21], [-100, -100]]))
    start, end = out.start_logits.double(), out.end_logits.double()
    expected_one = (F.cross_entropy(start, torch.tensor([12, 15])) + F.cross_entropy(end, torch.tensor([14, 30]))) / 2
    for loss in (one.loss, column.loss, padded.loss):
        assert loss.item() == pytest.approx(expected_one.item(), rel=1e-5)

    def nll(logits, targets):  # -log of the softmax mass on a set of positions
        return -torch.logsumexp(logits.log_softmax(-1)[list(targets)], 0)

    expected = ((nll(start[0], {12, 20}) + nll(start[1], {15})) / 2 + (nll(end[0], {14, 21}) + nll(end[1], {30, 33})) / 2) / 2
    assert several.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert empty_row.loss.item() == pytest.approx(((nll(start[0], {12, 20}) + nll(end[0], {14, 21})) / 2).item(),
                                                  rel=1e-5)
    model.train()
    model(**inputs, start_positions=torch.tensor([[12, 20], [15, -100]]),
          end_positions=torch.tensor([[14, 21], [30, -100]])).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_sequence_classification_defaults_to_global_first_token():
    model = build("LongformerForSequenceClassification")
    ids, am, _ = make_batch(2, 25, (25, 12))
    first = torch.zeros_like(ids)
    first[:, 0] = 1
    with torch.no_grad():
        assert torch.equal(model(ids, am).logits, model(ids, am, global_attention_mask=first).logits)
        embeds = model.get_input_embeddings()(ids)
        assert (model(inputs_embeds=embeds, attention_mask=am).logits - model(ids, am).logits).abs().max() < 1e-5


# ---- embeddings, resizing, heads of another size ---------------------------------------------------
def test_resize_token_embeddings_keeps_the_decoder_tied_and_loads_in_transformers(tmp_path):
    model = build("LongformerForMaskedLM")
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(130)
    emb, decoder = model.get_input_embeddings(), model.get_output_embeddings()
    assert model.config.vocab_size == 130 and emb.weight.shape == (130, 32) and torch.equal(emb.weight[:120], old)
    assert emb.padding_idx == 1 and decoder.weight is emb.weight and decoder.bias is model.lm_head.bias
    assert decoder.bias.shape == (130,) and isinstance(decoder, ds_longformer.model.MLMDecoder)
    ids, am, _ = make_batch(2, 20, (20, 14), vocab=130)
    labels = torch.where(am.bool(), ids, -100)
    model.train()
    model(ids, am, labels=labels).loss.backward()  # the chunked loss over the new vocabulary
    hf = hf_twin(model.eval(), tmp_path, transformers.LongformerForMaskedLM)
    with torch.no_grad():
        assert_same_outputs(model(ids, am, labels=labels), hf(input_ids=ids, attention_mask=am, labels=labels),
                            ["loss", "logits"])


def test_resized_candidate_scorer_grows_only_its_input_embeddings():
    """What WikiHop does with its four added tokens: rows appended around the old rows' mean."""
    model = ds_longformer.LongformerForCandidateScoring(tiny_config())
    old = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(124)
    new = model.get_input_embeddings().weight
    assert model.config.vocab_size == 124 and torch.equal(new[:120], old)
    assert (new[120:] - old.mean(0)).abs().max() < 0.01  # near the mean, not the initializer's spread


def test_num_labels_and_mismatched_heads(tmp_path):
    """num_labels -> id2label; a 3-label classifier re-headed to 5 labels with ignore_mismatched_sizes
    (the encoder kept, the head new); without it a clear error naming the weights."""
    build("LongformerForSequenceClassification").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the model's shapes: .*classifier.out_proj.weight: "
                                         r"checkpoint \(3, 32\) vs model \(5, 32\)"):
        LongformerForSequenceClassification.from_pretrained(tmp_path, num_labels=5)
    model, info = LongformerForSequenceClassification.from_pretrained(tmp_path, num_labels=5,
                                                                       ignore_mismatched_sizes=True,
                                                                       output_loading_info=True)
    assert model.config.id2label == {i: f"LABEL_{i}" for i in range(5)} and model.classifier.out_proj.out_features == 5
    assert {key for key, _, _ in info["mismatched_keys"]} == {"classifier.out_proj.weight", "classifier.out_proj.bias"}
    reloaded = LongformerForSequenceClassification.from_pretrained(tmp_path)
    assert torch.equal(model.longformer.embeddings.word_embeddings.weight,
                       reloaded.longformer.embeddings.word_embeddings.weight)


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("global_tokens", ["none", "few"])
def test_every_parameter_gets_a_gradient(name, global_tokens):
    """Every trainable parameter has a gradient, zeros where the true one is zero: the global
    projections of a batch without global tokens, key_global's bias in the absorbed global rows
    (G < head_dim), so DDP and ZeRO need no unused-parameter search."""
    model = build(name).train()
    inputs = head_inputs(name)
    if global_tokens == "none":
        inputs["global_attention_mask"] = torch.zeros_like(inputs["input_ids"])
    out = model(**inputs)
    (out.loss if "loss" in out else out.last_hidden_state.sum() + out.pooler_output.sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    key_bias = model.base_model.encoder.layer[0].attention.self.key_global.bias.grad
    assert key_bias.abs().max() < 1e-8  # zero (rounding where G >= head_dim projects every token)
    if global_tokens == "none" or name in ("LongformerModel", "LongformerForMaskedLM"):  # absorbed or absent
        assert not key_bias.any()


@pytest.mark.parametrize("name", ["LongformerForSequenceClassification", "LongformerForQuestionAnswering",
                                  "LongformerForMultipleChoice"])
def test_gradient_checkpointing_equals_plain(name):
    """transformers' switch (activation_checkpointing_enable): the same loss and gradients, with dropout."""
    model = build(name, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).train()
    inputs = head_inputs(name)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
        model.zero_grad()
        torch.manual_seed(3)
        loss = model(**inputs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=0, atol=1e-6, msg=n)
