"""torch.compile, the opt-in (`MultimodalLM.compile`): what it compiles is one graph each (fullgraph=True turns any
graph break into an error), and compiled outputs equal eager ones. The "eager" backend keeps these tests fast:
dynamo still traces the whole graph, but no inductor kernel is built."""

import copy

import pytest
import torch
import torch._dynamo

import tessera.linear as linear_module
from tessera import MultimodalLM
from tessera.config import TextConfig
from tessera.text.cache import KVCache
from tessera.text.decoder import DecoderLLM
from tests.conftest import tiny_config
from tests.test_model import _generation_batch, _open_gates

ATOL = 1e-5


class CountingBackend:
    """A torch.compile backend that runs each captured graph eagerly and counts (and keeps) them."""

    def __init__(self):
        self.graphs = 0
        self.modules = []

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        self.modules.append(graph_module)
        return graph_module.forward


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(fusion: str) -> MultimodalLM:
    model = MultimodalLM(tiny_config(fusion, cross_attention_layers=[0, 2])).eval()
    _open_gates(model, 0.7)
    return model


def _prefill(model: MultimodalLM, ids, mask, pixels, counts, max_new: int) -> KVCache:
    cache = KVCache(model.config.text, ids.shape[0], ids.shape[1] + max_new, model.dtype)
    with torch.no_grad():
        model(ids, mask, pixels, counts, cache=cache, logits_to_keep=1)
    return cache


def test_compile_is_off_by_default():
    model = _model("unified")
    assert model._decode_step is None
    assert "run_layers" not in vars(model.llm)  # the class's method, not a compiled replacement


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_decode_step_is_one_graph_and_equals_eager(fusion):
    """The whole forward of a decode step (left-padded batch, images, KV cache) compiles without a graph break,
    gives the eager logits, and after the first two steps (static, then dynamic sizes) never recompiles."""
    eager = _model(fusion)
    backend = CountingBackend()
    compiled = copy.deepcopy(eager).compile(backend=backend)
    _, ids, mask, pixels, counts = _generation_batch(fusion)
    steps = 5
    caches = {"eager": _prefill(eager, ids, mask, pixels, counts, steps),
              "compiled": _prefill(compiled, ids, mask, pixels, counts, steps)}
    next_position = mask.sum(-1, keepdim=True)
    graphs_after = []
    for step in range(steps):
        tokens = torch.tensor([[20 + step], [30 + step], [40 + step]])
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=-1)
        with torch.no_grad():
            want = eager(tokens, mask, position_ids=next_position, cache=caches["eager"]).logits
            got = compiled._decode_step(tokens, mask, position_ids=next_position, cache=caches["compiled"]).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)
        next_position = next_position + 1
        graphs_after.append(backend.graphs)
    assert graphs_after[0] >= 1  # the step really ran compiled
    assert graphs_after[1] == graphs_after[-1], f"recompiled during decode: graphs after each step {graphs_after}"


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_generate_with_compile_uses_the_compiled_step(fusion):
    eager = _model(fusion)
    backend = CountingBackend()
    compiled = copy.deepcopy(eager).compile(backend=backend)
    _, ids, mask, pixels, counts = _generation_batch(fusion)
    want = eager.generate(ids, mask, pixels, counts, max_new_tokens=6, eos_token_id=[])
    got = compiled.generate(ids, mask, pixels, counts, max_new_tokens=6, eos_token_id=[])
    assert got.sequences == want.sequences
    assert backend.graphs >= 3  # vision encoder, layer stack at prefill, decode step


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_training_forward_and_backward_with_compiled_parts_equal_eager(fusion):
    """Training runs the compiled vision encoder and layer stack (one graph each) inside the eager forward; the
    loss and the gradients are the eager ones."""
    eager = _model(fusion).train()
    backend = CountingBackend()
    compiled = copy.deepcopy(eager).compile(backend=backend)
    _, ids, mask, pixels, counts = _generation_batch(fusion)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : ids.shape[1] // 2] = -100
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        losses[name] = model(ids, mask, pixels, counts, labels=labels).loss
        losses[name].backward()
    assert backend.graphs >= 2  # vision encoder and layer stack
    torch.testing.assert_close(losses["compiled"], losses["eager"], atol=ATOL, rtol=ATOL)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("with_padding", [False, True])
def test_text_only_decoder_forward_is_one_graph(with_padding):
    """The plain text LM: the whole DecoderLLM forward — prefill into the cache, then a decode step — is one
    graph each, with or without padding."""
    llm = DecoderLLM(tiny_config().text).eval()
    compiled = torch.compile(llm, fullgraph=True, backend="eager")
    ids = torch.tensor([[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    if with_padding:
        mask[1, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=mask), llm(ids, attention_mask=mask),
                                   atol=ATOL, rtol=ATOL)
        caches = [KVCache(llm.config, 2, 8, torch.float32) for _ in range(2)]
        outputs = []
        for model, cache in zip((llm, compiled), caches):
            first = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
            step = model(torch.tensor([[13], [14]]), attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], -1),
                         cache=cache)
            outputs.append((first, step))
    for got, want in zip(outputs[1], outputs[0]):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=ATOL)


@pytest.mark.skipif(linear_module.backend() != "onednn", reason="the row-block route is tessera's CPU routing")
def test_a_compiled_one_row_step_multiplies_in_row_blocks():
    """Compiled, a one-row float32 product stays the row-block bmm of eager decoding (tessera.linear), where
    inductor would take MKL's matrix-vector product: that read the weights at half the speed, and the compiled
    batch-1 decode step of the benchmark LLM was 1.7× slower than eager. Weights of 512² and more take the route."""
    llm = DecoderLLM(TextConfig(vocab_size=512, hidden_size=512, num_layers=1, num_heads=8, num_kv_heads=4,
                                intermediate_size=512, max_position_embeddings=64)).eval()
    backend = CountingBackend()
    compiled = torch.compile(llm, fullgraph=True, backend=backend)
    ids = torch.tensor([[1, 5, 6, 7]])
    caches = [KVCache(llm.config, 1, 8, torch.float32) for _ in range(2)]
    steps = []
    with torch.no_grad():
        for model, cache in zip((llm, compiled), caches):
            model(ids, cache=cache, logits_to_keep=1)
            steps.append(model(torch.tensor([[9]]), cache=cache))
    torch.testing.assert_close(steps[1], steps[0], atol=ATOL, rtol=ATOL)
    step_graph = backend.modules[-1].graph  # the decode step's (the prefill's came first)
    products = [node.target for node in step_graph.nodes if node.op == "call_function"]
    assert products.count(torch.bmm) == 5, products  # q/k/v, output, gate/up, down, LM head: all in row blocks


@pytest.mark.skipif(linear_module.backend() != "onednn", reason="the oneDNN route is tessera's CPU routing")
def test_compiled_training_multiplies_through_onednn_forward_and_backward():
    """Compiled with gradients, the float32 products stay tessera's oneDNN operator (a custom op inductor cannot
    swap for MKL's sgemm), in the forward and in the backward graph; loss and gradients equal eager's."""
    config = TextConfig(vocab_size=512, hidden_size=512, num_layers=1, num_heads=8, num_kv_heads=4,
                        intermediate_size=512, max_position_embeddings=64)
    eager = DecoderLLM(config).train()
    forward_graphs, backward_graphs = CountingBackend(), CountingBackend()
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def backend(graph_module, example_inputs):  # AOT autograd splits the graph into a forward and a backward
        return aot_module_simplified(graph_module, example_inputs,
                                     fw_compiler=lambda g, inputs: make_boxed_func(forward_graphs(g, inputs)),
                                     bw_compiler=lambda g, inputs: make_boxed_func(backward_graphs(g, inputs)))

    compiled_llm = copy.deepcopy(eager)
    compiled = torch.compile(compiled_llm, fullgraph=True, backend=backend)
    ids = torch.randint(0, 512, (2, 12))
    losses = [model(ids).float().logsumexp(-1).mean() for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=ATOL)
    for (name, p), q in zip(eager.named_parameters(), compiled_llm.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)

    def targets(graphs):
        return [str(node.target) for module in graphs.modules for node in module.graph.nodes
                if node.op == "call_function"]

    forward, backward = targets(forward_graphs), targets(backward_graphs)
    # q/k/v, output, gate/up, down, LM head forward; their input gradients backward (the embedding's needs none)
    assert sum("onednn_matmul" in t for t in forward) == 5, forward
    assert sum("onednn_matmul" in t for t in backward) == 5, backward
    assert not any(t.startswith(("aten.addmm", "aten.linear")) for t in forward + backward)  # forward and input gradients: none left to MKL
