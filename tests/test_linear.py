"""tessera.linear: the oneDNN route for float32 Linear layers gives nn.Linear's numbers, forward and backward, and
is taken exactly where it is meant to be."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tessera.linear as linear_module
from tessera.linear import Linear, linear

needs_onednn = pytest.mark.skipif(linear_module.backend() != "onednn", reason="this torch build has no oneDNN linear")
needs_bf16_packing = pytest.mark.skipif(not linear_module.BF16_PACKING,
                                        reason="oneDNN cannot reorder bf16 weights on this CPU")


@pytest.fixture(autouse=True)
def plenty_of_memory(monkeypatch):
    """Packed copies are made whatever this machine's free memory (a tight CI container would refuse them); the
    tests of the memory check set their own figures."""
    monkeypatch.setattr(linear_module, "available_memory", lambda: (1 << 40, 1 << 41))


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the products that go through oneDNN."""
    calls = []
    op = linear_module._OP

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return op(*args)

    monkeypatch.setattr(linear_module, "_OP", counted)
    return calls


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 512), (7, 512), (1, 1, 512)])
def test_forward_and_gradients_match_nn_linear(bias, shape, onednn_calls):
    reference = nn.Linear(512, 640, bias=bias)
    ours = Linear(512, 640, bias=bias)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(shape)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(*shape[:-1], 640)
    reference(x_ref).backward(grad)
    y = ours(x_ours)
    y.backward(grad)
    assert onednn_calls, "a 640×512 product should go through oneDNN"
    torch.testing.assert_close(y, F.linear(x, reference.weight, reference.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_frozen_layer_passes_gradients_to_its_input_only(onednn_calls):
    layer = Linear(512, 512).requires_grad_(False)
    x = torch.randn(4, 512, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(4, -1), atol=1e-5, rtol=1e-5)
    assert onednn_calls


@needs_onednn
def test_non_contiguous_inputs(onednn_calls):
    weight = torch.randn(600, 512)
    x = torch.randn(512, 9).t()  # (9, 512), transposed in memory
    torch.testing.assert_close(linear(x, weight), x @ weight.t(), atol=1e-4, rtol=1e-5)
    assert onednn_calls


@needs_onednn
@pytest.mark.parametrize("case", ["small product", "bfloat16", "autocast", "empty batch", "float64"])
def test_what_stays_with_pytorch(case, onednn_calls):
    weight, x = torch.randn(600, 512), torch.randn(4, 512)
    if case == "small product":  # below the sizes where oneDNN's per-call cost pays off
        weight, x = torch.randn(128, 128), torch.randn(2, 128)
        expected = F.linear(x, weight)
        assert torch.equal(linear(x, weight), expected)
    elif case == "bfloat16":
        weight, x = weight.bfloat16(), x.bfloat16()
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    elif case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = linear(x, weight)
        assert y.dtype == torch.bfloat16
    elif case == "empty batch":
        assert linear(torch.randn(0, 512), weight).shape == (0, 600)
    else:
        weight, x = weight.double(), x.double()
        assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert onednn_calls == []


@needs_onednn
def test_large_products_take_the_onednn_route(onednn_calls):
    linear(torch.randn(2, 512), torch.randn(512, 512))  # two rows through a 1 MB weight
    linear(torch.randn(1536, 128), torch.randn(128, 128))  # a small weight over many rows: 24M multiply-adds
    linear(torch.randn(1535, 128), torch.randn(128, 128))  # one row fewer: PyTorch's default
    assert onednn_calls == [(2, 512), (1536, 128)]


def test_linear_is_a_drop_in_nn_linear():
    layer = Linear(8, 4)
    assert isinstance(layer, nn.Linear)
    assert list(layer.state_dict()) == list(nn.Linear(8, 4).state_dict())


def _backend_in_a_fresh_process(value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TESSERA_LINEAR_BACKEND=value)
    return subprocess.run([sys.executable, "-c", "import tessera.linear as l; print(l.backend())"],
                          capture_output=True, text=True, env=env)


def test_the_environment_switches_onednn_off():
    result = _backend_in_a_fresh_process("aten")
    assert result.returncode == 0 and result.stdout.strip() == "aten"


def test_an_unknown_backend_is_named_where_layers_are_made_and_by_the_cli_in_one_line():
    result = _backend_in_a_fresh_process("cublas")
    assert result.returncode != 0
    assert "ConfigError: TESSERA_LINEAR_BACKEND='cublas': expected one of onednn, aten" in result.stderr
    env = dict(os.environ, TESSERA_LINEAR_BACKEND="cublas")
    layer = subprocess.run([sys.executable, "-c", "import tessera; print('imported'); tessera.linear.Linear(4, 4)"],
                           capture_output=True, text=True, env=env)  # importing is not refused, making a layer is
    assert layer.returncode != 0 and layer.stdout == "imported\n"
    assert "ConfigError: TESSERA_LINEAR_BACKEND='cublas'" in layer.stderr
    product = subprocess.run([sys.executable, "-c", "import torch, tessera.linear as l; l.linear(torch.ones(2, 4), "
                              "torch.ones(3, 4))"], capture_output=True, text=True, env=env)  # no Linear made
    assert product.returncode != 0 and "ConfigError: TESSERA_LINEAR_BACKEND='cublas'" in product.stderr
    command = "import sys; from tessera.cli import main; sys.exit(main(['recipes']))"
    cli = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, env=env)
    assert cli.returncode == 2 and cli.stdout == ""
    assert cli.stderr == ("tessera recipes: error: TESSERA_LINEAR_BACKEND='cublas': expected one of onednn, aten "
                          "(or the variable unset: onednn)\n")


# --- batch-1 decoding: the matrix-vector product as a batch of row blocks ------------------------------------------
@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("out_features", [640, 520])  # blocks of 64 rows; 520 is divisible by 8 only
@pytest.mark.parametrize("shape", [(1, 512), (1, 1, 512), (512,)])
def test_one_row_without_gradients_matches_nn_linear(bias, out_features, shape, onednn_calls):
    layer = Linear(512, out_features, bias=bias)
    x = torch.randn(shape)
    with torch.no_grad():
        y = layer(x)
    assert not onednn_calls, "one row should be multiplied block by block, not by oneDNN"
    assert y.shape == (*shape[:-1], out_features)
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_one_row_taken_from_a_wider_tensor():
    layer = Linear(512, 640)
    # not contiguous; and a prefill's last row, which starts inside its tensor's storage
    for x in torch.randn(3, 1024)[1:2, ::2], torch.randn(1, 5, 512)[:, -1:]:
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("case", ["odd output size", "transposed weight"])
def test_one_row_falls_back_to_onednn_when_the_weight_cannot_be_cut_into_blocks(case, onednn_calls):
    weight = torch.randn(515, 512) if case == "odd output size" else torch.randn(512, 640).t()
    weight /= 512**0.5  # the scale of nn.Linear's initialisation
    x = torch.randn(1, 512)
    assert linear_module.matrix_vector(x, weight, None) is None
    layer = Linear(512, weight.shape[0], bias=False)
    layer.weight = nn.Parameter(weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, weight), atol=1e-5, rtol=1e-5)
    assert onednn_calls == [(1, 512)]


# --- batched decoding: the weight reordered once into oneDNN's blocked layout --------------------------------------
@needs_onednn
def test_a_few_rows_without_gradients_use_the_packed_weight_and_keep_it():
    layer = Linear(512, 640)
    x = torch.randn(8, 1, 512)
    with torch.no_grad():
        y = layer(x)
        packed = layer.packed_weight()
        layer(x)
    assert packed is not None and layer.packed_weight() is packed  # made once, reused
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_the_packed_weight_follows_a_changed_weight():
    layer = Linear(512, 640)
    x = torch.randn(4, 512)
    with torch.no_grad():
        layer(x)
        layer.weight.mul_(-2)  # as an optimizer step or load_state_dict would: in place, the version moves on
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("switch", ["train", "eval"])
def test_train_and_eval_drop_the_packed_copy(switch):
    layer = Linear(512, 640)
    with torch.no_grad():
        layer(torch.randn(4, 512))
    assert layer._packed is not None and layer._packed[1] is not None
    getattr(layer, switch)()
    assert layer._packed is None


@needs_onednn
@pytest.mark.parametrize("case", ["one row", "gradients"])
def test_no_packed_copy_for_one_row_or_with_gradients(case):
    layer = Linear(512, 640)
    if case == "gradients":
        x = torch.randn(8, 512, requires_grad=True)
        layer(x).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
    else:
        with torch.no_grad():
            layer(torch.randn(1, 512))
    assert layer._packed is None


@needs_onednn
def test_a_float32_prefill_multiplies_by_the_packed_weight(onednn_calls):
    layer = Linear(512, 640)
    x = torch.randn(2, 150, 512)  # 300 rows: a prompt, not a decode step
    with torch.no_grad():
        y = layer(x)
    assert layer._packed is not None and layer._packed[1] is not None
    assert onednn_calls == [(2, 150, 512)]
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


@needs_bf16_packing
@pytest.mark.parametrize("rows", [2, 8, 64])
def test_a_bf16_layer_decoding_a_batch_uses_the_packed_weight(rows, onednn_calls):
    """bf16 batched decoding (no gradients, 2–64 rows) multiplies by the blocked copy: F.linear's plain-layout bf16
    product read the weights at 13 GB/s, the blocked one at 18."""
    layer = Linear(512, 640).bfloat16()
    x = torch.randn(rows, 512).bfloat16()
    with torch.no_grad():
        y = layer(x)
    assert onednn_calls == [(rows, 512)] and layer.packed_weight() is not None
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(y.float(), expected, atol=0.03, rtol=0.02)  # bf16 output, float32 accumulation


@needs_onednn
@pytest.mark.parametrize("case", ["gradients", "many rows", "one row"])
def test_other_bf16_products_stay_with_pytorch(case, onednn_calls):
    """Training and prefill in bf16 are F.linear's; so is one row, where a second copy would cost bf16 the memory it
    saves."""
    layer = Linear(512, 640).bfloat16()
    if case == "gradients":
        x = torch.randn(8, 512).bfloat16().requires_grad_()
        layer(x).sum().backward()
        assert x.grad is not None and layer.weight.grad is not None
    else:
        x = torch.randn(300 if case == "many rows" else 1, 512).bfloat16()
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert onednn_calls == [] and layer._packed is None


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16_packing)])
def test_no_packed_copy_when_memory_is_short(dtype, monkeypatch, onednn_calls):
    """The blocked copy doubles the weight's memory: when it would leave less than the reserve available (a big model
    in a small machine), the layer multiplies its plain weight, and does not measure again at every step."""
    measured = []

    def memory():
        measured.append(1)
        return 3 << 30, 16 << 30  # 3 of 16 GiB available: under the 25% reserve already

    monkeypatch.setattr(linear_module, "available_memory", memory)
    layer = Linear(512, 640).to(dtype)
    x = torch.randn(8, 512).to(dtype)
    with torch.no_grad():
        y = layer(x)
        layer(x)
    assert layer.packed_weight() is None and len(measured) == 1
    # float32 still multiplies in oneDNN, with the plain weight; bf16 goes back to F.linear
    assert onednn_calls == ([(8, 512)] * 2 if dtype is torch.float32 else [])
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float())
    torch.testing.assert_close(y.float(), expected, atol=0.03 if dtype is torch.bfloat16 else 1e-5, rtol=1e-2)


@needs_onednn
def test_a_refused_copy_is_tried_again_later(monkeypatch):
    """A shortage can pass (a server's first batch arriving while something else is loading): after
    PACKING_RETRY_SECONDS the layer measures again and makes its copy."""
    figures = [(3 << 30, 16 << 30)]  # short
    monkeypatch.setattr(linear_module, "available_memory", lambda: figures[0])
    clock = [1000.0]
    monkeypatch.setattr(linear_module.time, "monotonic", lambda: clock[0])
    layer = Linear(512, 640)
    assert layer.packed_weight() is None
    figures[0] = (12 << 30, 16 << 30)  # memory came back
    clock[0] += linear_module.PACKING_RETRY_SECONDS - 1
    assert layer.packed_weight() is None  # not measured again yet
    clock[0] += 2
    assert layer.packed_weight() is not None


def test_room_for_a_packed_copy_keeps_the_reserve(monkeypatch):
    weight = torch.empty(1024, 1024)  # 4 MiB
    total = 64 << 20
    reserve = int(linear_module.PACKING_MEMORY_RESERVE * total)
    monkeypatch.setattr(linear_module, "available_memory", lambda: (reserve + (4 << 20), total))
    assert linear_module.room_for_a_packed_copy(weight)
    monkeypatch.setattr(linear_module, "available_memory", lambda: (reserve + (4 << 20) - 1, total))
    assert not linear_module.room_for_a_packed_copy(weight)
    monkeypatch.setattr(linear_module, "available_memory", lambda: None)  # unknown (no /proc/meminfo): as before
    assert linear_module.room_for_a_packed_copy(weight)


@needs_onednn
def test_a_layer_with_a_packed_copy_can_be_deep_copied_and_pickled(tmp_path):
    layer = Linear(512, 640)
    x = torch.randn(4, 512)
    with torch.no_grad():
        expected = layer(x)
    assert layer._packed is not None and layer._packed[1] is not None
    copied = copy.deepcopy(layer)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    with torch.no_grad():
        for other in (copied, loaded):
            torch.testing.assert_close(other(x), expected, atol=1e-5, rtol=1e-5)
    assert layer._packed[1] is not None  # the original keeps its copy
