"""worker.embedding_gradient: the input embedding's gradient index-added into .grad equals
autograd's (padding_idx rows left out, accumulated over calls, a tied head's added too)."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cispo.worker.embedding_gradient import add_into_grad


def test_embedding_gradient_into_grad_equals_autograd():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=3, tie_word_embeddings=True)
    plain = LlamaForCausalLM(config).eval()
    hooked = copy.deepcopy(plain)
    assert add_into_grad(hooked) and plain.get_input_embeddings().padding_idx == 3
    ids = torch.tensor([[3, 5, 5, 9, 3, 96, 0, 5]])
    # The hooked embedding's output is made by the Function that writes into .grad.
    assert type(hooked.get_input_embeddings()(ids).grad_fn).__name__ == "_EmbeddingIntoGradBackward"
    assert type(plain.get_input_embeddings()(ids).grad_fn).__name__ == "EmbeddingBackward0"
    for step in range(2):  # the second accumulates onto the first
        for model in (plain, hooked):
            model(input_ids=(ids + step) % 97, use_cache=False).logits.square().sum().backward()
        grad = hooked.get_input_embeddings().weight.grad
        torch.testing.assert_close(grad, plain.get_input_embeddings().weight.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(plain.parameters(), hooked.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(hooked(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def test_only_plain_embeddings_are_hooked():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    model.get_input_embeddings().max_norm = 1.0
    assert not add_into_grad(model)
