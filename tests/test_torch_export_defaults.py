"""``onnx_nf4.torch.export(model, args, path)`` with its defaults exports what ``torch.onnx.export`` exports with
its own: one test per model family (MLP with a 2-D input, bitsandbytes MLP at block 64/128 with and without double
quantization, CNN, transformer), the dimensions kept dynamic by default, and the dynamic-shape options."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")

from bnb_models import REL_TOL, bnb_tensors, graph_tensors, nf4_nodes, ort_session, relative_error  # noqa: E402
from bnb_models import to_linear4bit as bnb_linear  # noqa: E402

from onnx_nf4.codec.layout import dequantize_weight, quantize_weight  # noqa: E402
from onnx_nf4.torch import export  # noqa: E402


def input_dims(path) -> list[list[int | str]]:
    """Each graph input's dimensions: an int when static, the dimension's name when dynamic."""
    return [
        [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in onnx.load(str(path)).graph.input
    ]


def nf4_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the float ``model`` whose ``nn.Linear`` weights are the NF4 weights the pass writes (block 64)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, torch.nn.Linear):
                w = dequantize_weight(quantize_weight(module.weight.numpy().T, 64))
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
    return rounded


def run_torch(model: torch.nn.Module, *args: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(*args).numpy()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 128)).eval()


# ------------------------------------------------------------------------------------------------- MLPs


@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-dq"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_linear4bit_mlp_with_a_2d_input(tmp_path, blocksize, double_quant):
    """``Sequential(Linear4bit(256, 512), GELU(), Linear4bit(512, 128))`` on ``x [4, 256]``, defaults only."""
    float_model = mlp()
    model = torch.nn.Sequential(
        bnb_linear(float_model[0], blocksize, double_quant),
        torch.nn.GELU(),
        bnb_linear(float_model[2], blocksize, double_quant),
    ).eval()
    x = torch.randn(4, 256)
    path = tmp_path / "mlp.onnx"
    report = export(model, (x,), path)
    assert input_dims(path) == [[4, 256]]  # no dimension is known to vary: static, as torch.onnx.export makes it
    assert len(report.layers) == 2 and not report.skipped
    assert {graph_tensors(inputs) for _, inputs in nf4_nodes(path)} == {bnb_tensors(model[0]), bnb_tensors(model[2])}
    decoded = copy.deepcopy(float_model)
    with torch.no_grad():
        for index in (0, 2):
            state = model[index].weight.quant_state
            decoded[index].weight.copy_(bnb.functional.dequantize_4bit(model[index].weight.data, state).float())
    (actual,) = ort_session(path).run(None, {"input": x.numpy()})
    assert relative_error(actual, run_torch(decoded, x)) <= REL_TOL


def test_float_mlp_with_a_2d_input(tmp_path):
    model = mlp()
    x = torch.randn(4, 256)
    path = tmp_path / "mlp.onnx"
    report = export(model, (x,), path)
    assert input_dims(path) == [[4, 256]]
    assert len(report.layers) == 2
    (actual,) = ort_session(path).run(None, {"input": x.numpy()})
    assert relative_error(actual, run_torch(nf4_rounded(model), x)) <= REL_TOL


# -------------------------------------------------------------------------------------------------- CNN


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten()
        )
        self.head = torch.nn.Linear(16 * 8 * 8, 64)

    def forward(self, images):
        return self.head(self.features(images))


def test_cnn(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    images = torch.randn(2, 3, 16, 16)
    path = tmp_path / "cnn.onnx"
    report = export(model, (images,), path)
    assert input_dims(path) == [[2, 3, 16, 16]]
    assert len(report.layers) == 1  # the Linear head; a Conv is not a MatMul
    (actual,) = ort_session(path).run(None, {"images": images.numpy()})
    assert relative_error(actual, run_torch(nf4_rounded(model), images)) <= REL_TOL


# ---------------------------------------------------------------------------------------------- transformer


class TinyBert(torch.nn.Module):
    """A randomly initialized 2-layer BERT, ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        self.bert = transformers.BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tokens(batch: int, sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + sequence)
    input_ids = torch.randint(0, 1000, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, sequence, dtype=torch.int64)
    attention_mask[0, sequence // 2 :] = 0  # some padding
    return input_ids, attention_mask


def test_transformer_token_inputs_get_dynamic_batch_and_sequence(tmp_path):
    torch.manual_seed(0)
    model = TinyBert().eval()
    path = tmp_path / "bert.onnx"
    report = export(model, tokens(2, 7), path)
    assert input_dims(path) == [["batch", "sequence"], ["batch", "sequence"]]
    assert len(report.layers) == 12  # q, k, v, attention output, intermediate, output in each of 2 layers
    session = ort_session(path)
    reference = nf4_rounded(model)
    for batch, sequence in ((2, 7), (3, 11), (1, 4)):
        input_ids, attention_mask = tokens(batch, sequence)
        (actual,) = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        assert relative_error(actual, run_torch(reference, input_ids, attention_mask)) <= REL_TOL


class FixedLength(torch.nn.Module):
    """Token inputs whose sequence length the model fixes (a learned position table of exactly 8 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(100, 64)
        self.position = torch.nn.Parameter(torch.randn(1, 8, 64))
        self.proj = torch.nn.Linear(64, 128)

    def forward(self, input_ids):
        return self.proj(self.embedding(input_ids) + self.position)


def test_a_model_that_fixes_the_sequence_length_exports_static_with_a_warning(tmp_path):
    torch.manual_seed(0)
    model = FixedLength().eval()
    input_ids = torch.randint(0, 100, (2, 8))
    path = tmp_path / "fixed.onnx"
    with pytest.warns(UserWarning, match=r"input_ids: batch, sequence .*static shape of 8.* static shapes instead"):
        export(model, (input_ids,), path)
    assert input_dims(path) == [[2, 8]]
    (actual,) = ort_session(path).run(None, {"input_ids": input_ids.numpy()})
    assert relative_error(actual, run_torch(nf4_rounded(model), input_ids)) <= REL_TOL
    # Axes the caller asks for are not second-guessed: torch's error comes through.
    with pytest.raises(torch.onnx.errors.OnnxExporterError):
        export(model, (input_ids,), tmp_path / "asked.onnx", dynamic_axes={"input_ids": {0: "b", 1: "s"}})


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_dynamic_axes_true_makes_the_batch_dynamic(tmp_path, dynamo):
    model = mlp()
    path = tmp_path / "mlp.onnx"
    export(model, (torch.randn(4, 256),), path, dynamic_axes=True, dynamo=dynamo)
    assert input_dims(path) == [["batch", 256]]
    x = torch.randn(3, 256)
    (actual,) = ort_session(path).run(None, {"input": x.numpy()})
    assert relative_error(actual, run_torch(nf4_rounded(model), x)) <= REL_TOL


def test_dynamic_shapes_are_passed_to_the_dynamo_exporter(tmp_path):
    path = tmp_path / "mlp.onnx"
    export(mlp(), (torch.randn(4, 256),), path, dynamic_shapes=({0: torch.export.Dim("rows")},))
    assert input_dims(path) == [["rows", 256]]


def test_dynamic_shape_option_errors(tmp_path):
    args = (torch.randn(4, 256),)
    shapes = ({0: torch.export.Dim("rows")},)
    with pytest.raises(ValueError, match="dynamic_shapes needs the dynamo exporter"):
        export(mlp(), args, tmp_path / "a.onnx", dynamo=False, dynamic_shapes=shapes)
    with pytest.raises(ValueError, match="not both"):
        export(mlp(), args, tmp_path / "a.onnx", dynamic_shapes=shapes, dynamic_axes={"input": {0: "batch"}})
    assert list(tmp_path.iterdir()) == []
