"""Bad input gets the exception torch.nn raises for it, with torch.nn's message inside ours; never a
crash, a hang or a wrong answer.

The matrix below has, for every module and cell, each kind of hostile input: wrong ranks, feature
sizes, hidden-state shapes (batch, layers, directions, width), hx of the wrong kind, dtype and device
mismatches (devices as "meta" tensors), integer and bool inputs, malformed PackedSequences and
invalid constructor arguments. Each case asserts our exception class and that the message names the
argument and what was expected (`match`), and is differential: the same input goes through torch.nn,
and where torch.nn raises a TypeError, ValueError or RuntimeError ours must be of its type and carry
its message verbatim (code written against torch.nn's errors keeps working). Where torch.nn fails
unhelpfully (AttributeError, IndexError), runs silently, or fails inside a kernel on a PackedSequence
it does not check, ours stands alone: TORCH_NN_UNHELPFUL and PACKED_UNCHECKED_BY_TORCH_NN list those
cases, and the test checks that torch.nn still behaves as they say.
"""
import collections
import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fused_rnn

D = torch.float64
I, H = 4, 3
X = torch.randn(5, 2, I, dtype=D)           # [T, B, I]
X_UNBATCHED = torch.randn(5, I, dtype=D)    # [T, I]
XC = torch.randn(2, I, dtype=D)             # cell input [B, I]

LAYERS = {"LSTM": fused_rnn.LSTM, "GRU": fused_rnn.GRU, "RNN": fused_rnn.RNN}
CELLS = {"LSTMCell": fused_rnn.LSTMCell, "GRUCell": fused_rnn.GRUCell, "RNNCell": fused_rnn.RNNCell}


def z(*shape, dtype=D, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


def packed(rows, batch_sizes, sorted_indices=None, unsorted_indices=None, features=I, dtype=D):
    data = torch.randn(rows, features, dtype=dtype) if isinstance(rows, int) else rows
    return PackedSequence(data, batch_sizes, sorted_indices, unsorted_indices)


def _builders(cls, lstm, x):
    """The vocabulary of the case lists: make(**ctor_kwargs), state(*shape) (hx of the module's
    kind), call(args, **ctor_kwargs) and with_param(name, new_value_fn), which runs on x."""
    def make(**kw):
        return cls(I, H, dtype=D, **kw)

    def state(*shape, c_shape=None, **kw):
        return (z(*shape, **kw), z(*(c_shape or shape))) if lstm else z(*shape, **kw)

    def call(args, **kw):
        return lambda: make(**kw)(*args)

    def with_param(param, value):
        def run():
            m = make()
            setattr(m, param, value(getattr(m, param)))
            return m(x)
        return run

    return make, state, call, with_param


# ---------------------------------------------------------------------------------------------------
# The layers: LSTM, GRU, RNN
# ---------------------------------------------------------------------------------------------------

def _layer_cases(kind, cls):
    lstm = kind == "LSTM"
    st = "h_0" if lstm else "hx"  # the name of the (first) state in messages

    make, state, call, with_param = _builders(cls, lstm, X)

    size = r"\(num_layers \* num_directions, batch, hidden_size\)"
    cases = [
        # --- input rank and kind ---
        ("input_0d", call((torch.tensor(1.0, dtype=D),)), ValueError, "Expected input to be 2D or 3D, got 0D"),
        ("input_1d", call((torch.randn(I, dtype=D),)), ValueError, "Expected input to be 2D or 3D, got 1D"),
        ("input_4d", call((torch.randn(5, 2, I, 1, dtype=D),)), ValueError,
         "Expected input to be 2D or 3D, got 4D"),
        # torch.nn: AttributeError 'list' object has no attribute 'dim'
        ("input_list", call(([[1.0] * I],)), TypeError, "input must be a Tensor or a PackedSequence, got list"),
        ("input_none", call((None,)), TypeError, "input must be a Tensor or a PackedSequence, got NoneType"),
        ("input_tuple", call(((X, None),)), TypeError, "input must be a Tensor or a PackedSequence, got tuple"),
        # --- feature size ---
        ("features_batched", call((torch.randn(5, 2, 6, dtype=D),)), RuntimeError,
         "input.size\\(-1\\) must be equal to input_size. Expected 4, got 6"),
        ("features_unbatched", call((torch.randn(5, 6, dtype=D),)), RuntimeError,
         "input_size. Expected 4, got 6"),
        ("features_batch_first", call((torch.randn(2, 5, 1, dtype=D),), batch_first=True), RuntimeError,
         "input_size. Expected 4, got 1"),
        # --- no time steps (torch.nn: "Expected sequence length to be larger than 0") ---
        ("seq_len_0", call((torch.randn(0, 2, I, dtype=D),)), RuntimeError,
         r"Expected sequence length to be larger than 0 .* shape \(0, 2, 4\)"),
        ("seq_len_0_batch_first", call((torch.randn(2, 0, I, dtype=D),), batch_first=True), RuntimeError,
         "Expected sequence length to be larger than 0"),
        ("seq_len_0_unbatched", call((torch.randn(0, I, dtype=D),)), RuntimeError,
         "Expected sequence length to be larger than 0"),
        # --- dtypes ---
        ("input_int64", call((torch.ones(5, 2, I, dtype=torch.int64),)), ValueError,
         "input must be a floating point or complex tensor, got torch.int64"),
        ("input_bool", call((torch.ones(5, 2, I, dtype=torch.bool),)), ValueError,
         "input must be a floating point or complex tensor, got torch.bool"),
        ("input_float32", call((X.float(),)), ValueError,
         r"input dtype \(torch.float32\) does not match weight dtype \(torch.float64\) of parameter weight_ih_l0"),
        ("input_complex", call((X.to(torch.complex128),)), ValueError,
         r"input dtype \(torch.complex128\) does not match weight dtype \(torch.float64\)"),
        # torch.nn: "mat1 and mat2 must have the same dtype" (no name)
        ("param_dtype", with_param("weight_hh_l0", lambda w: nn.Parameter(w.detach().float())), RuntimeError,
         r"weight dtype \(torch.float32\) of parameter weight_hh_l0"),
        ("param_none", with_param("weight_hh_l0", lambda w: None), TypeError,
         "parameter weight_hh_l0 must be a Tensor, got NoneType"),
        # --- devices ("meta" stands in for another device) ---
        # torch.nn raises too; before the fix ours silently returned meta tensors.
        ("input_meta", call((torch.randn(5, 2, I, dtype=D, device="meta"),)), RuntimeError,
         "the input is on meta but parameter weight_ih_l0 is on cpu"),
        ("param_meta", with_param("weight_hh_l0", lambda w: nn.Parameter(w.detach().to("meta"))), RuntimeError,
         "the input is on cpu but parameter weight_hh_l0 is on meta"),
        ("hx_meta", call((X, state(1, 2, H, device="meta"))), RuntimeError, f"{st} is on meta but the input is on cpu"),
        # --- hx: dtype ---
        # torch.nn: "mat1 and mat2 must have the same dtype" (no name)
        ("hx_float32", call((X, state(1, 2, H, dtype=torch.float32))), RuntimeError,
         f"{st} has dtype torch.float32 but the input has dtype torch.float64"),
        ("hx_int64", call((X, state(1, 2, H, dtype=torch.int64))), RuntimeError,
         f"{st} has dtype torch.int64 but the input has dtype torch.float64"),
        # --- hx: rank ---
        ("hx_2d_for_batched", call((X, state(2, H))), RuntimeError,
         f"for batched 3-D input, {st} should be 3-D but got a 2-D tensor"),
        ("hx_3d_for_unbatched", call((X_UNBATCHED, state(1, 1, H))), RuntimeError,
         f"for unbatched 2-D input, {st} should be 2-D but got a 3-D tensor"),
        ("hx_4d", call((X, state(1, 1, 2, H))), RuntimeError, f"{st} should be 3-D but got a 4-D tensor"),
        # --- hx: shape ---
        ("hx_batch", call((X, state(1, 3, H))), RuntimeError,
         rf"Expected {st} of size \(1, 2, 3\) {size}, got \(1, 3, 3\)"),
        ("hx_batch_first", call((torch.randn(2, 5, I, dtype=D), state(1, 5, H)), batch_first=True),
         RuntimeError, rf"Expected {st} of size \(1, 2, 3\) {size}, got \(1, 5, 3\)"),
        ("hx_layers", call((X, state(1, 2, H)), num_layers=2), RuntimeError,
         rf"Expected {st} of size \(2, 2, 3\) {size}, got \(1, 2, 3\)"),
        ("hx_directions", call((X, state(1, 2, H)), bidirectional=True), RuntimeError,
         rf"Expected {st} of size \(2, 2, 3\) {size}, got \(1, 2, 3\)"),
        ("hx_width", call((X, state(1, 2, 5))), RuntimeError,
         rf"Expected {st} of size \(1, 2, 3\) {size}, got \(1, 2, 5\)"),
        ("hx_unbatched_width", call((X_UNBATCHED, state(1, 5))), RuntimeError,
         rf"Expected {st} of size \(1, 3\) \(num_layers \* num_directions, hidden_size\), got \(1, 5\)"),
        # --- hx of the wrong kind ---
        # torch.nn: AttributeError "'int' object has no attribute 'dim'" / TypeError not subscriptable
        ("hx_int", call((X, 3)), TypeError,
         r"hx must be a tuple \(h_0, c_0\) of two tensors, got int" if lstm else "hx must be a Tensor, got int"),
        ("hx_nested_list", call((X, [[0.0] * H] * 2)), TypeError,
         "h_0 must be a Tensor, got list" if lstm else "hx must be a Tensor, got list"),
        # --- malformed PackedSequences ---
        # torch.nn: "The size of tensor a (2) must match the size of tensor b (3)"
        ("packed_increasing", call((packed(6, torch.tensor([2, 3, 1])),)), ValueError,
         r"batch_sizes must be positive and non-increasing, got \[2, 3, 1\]"),
        # torch.nn: runs and returns a result (silently)
        ("packed_zero_length", call((packed(4, torch.tensor([2, 2, 0])),)), ValueError,
         r"batch_sizes must be positive and non-increasing, got \[2, 2, 0\]"),
        ("packed_negative_length", call((packed(4, torch.tensor([3, 2, -1])),)), ValueError,
         r"batch_sizes must be positive and non-increasing, got \[3, 2, -1\]"),
        # torch.nn: runs on the first 5 rows and ignores the sixth (silently)
        ("packed_rows_extra", call((packed(6, torch.tensor([3, 2])),)), ValueError,
         "batch_sizes sum to 5 but its data has 6 rows"),
        ("packed_rows_missing", call((packed(4, torch.tensor([3, 2])),)), ValueError,
         "batch_sizes sum to 5 but its data has 4 rows"),
        # torch.nn: IndexError "index 0 is out of bounds for dimension 0 with size 0"
        ("packed_empty", call((packed(0, torch.tensor([], dtype=torch.int64)),)), ValueError,
         "batch_sizes is empty; expected at least one time step"),
        # torch.nn: TypeError from torch.zeros about 'size'
        ("packed_float_batch_sizes", call((packed(5, torch.tensor([3.0, 2.0])),)), TypeError,
         "batch_sizes must be a 1-D integer tensor, got a 1-D torch.float32 tensor"),
        ("packed_2d_batch_sizes", call((packed(5, torch.tensor([[3, 2]])),)), TypeError,
         "batch_sizes must be a 1-D integer tensor, got a 2-D torch.int64 tensor"),
        ("packed_data_3d", call((packed(torch.randn(5, 1, I, dtype=D), torch.tensor([3, 2])),)), RuntimeError,
         r"PackedSequence data must be 2-D \(sum\(batch_sizes\), input_size\), got a 3-D tensor"),
        ("packed_data_1d", call((packed(torch.randn(5, dtype=D), torch.tensor([3, 2])),)), RuntimeError,
         "PackedSequence data must be 2-D .* got a 1-D tensor"),
        ("packed_features", call((packed(5, torch.tensor([3, 2]), features=6),)), RuntimeError,
         "input_size. Expected 4, got 6"),
        # torch.nn's LSTM skips its checks for packed input and fails in its matrix product (RuntimeError)
        ("packed_int_data", call((packed(torch.ones(5, I, dtype=torch.int64), torch.tensor([3, 2])),)),
         RuntimeError if lstm else ValueError, "input must be a floating point or complex tensor, got torch.int64"),
        ("packed_hx_batch", call((packed(5, torch.tensor([3, 2])), state(1, 2, H))), RuntimeError,
         rf"Expected {st} of size \(1, 3, 3\) {size}, got \(1, 2, 3\)"),
        # torch.nn: h_n silently loses a sequence
        ("packed_sorted_indices_length",
         call((packed(5, torch.tensor([3, 2]), torch.tensor([0, 1]), torch.tensor([0, 1])),)), ValueError,
         r"sorted_indices must be a 1-D integer tensor of length batch_sizes\[0\] = 3"),
        # torch.nn: h_n silently holds one sequence twice
        ("packed_sorted_indices_duplicate",
         call((packed(5, torch.tensor([3, 2]), torch.tensor([0, 0, 1]), torch.tensor([0, 0, 1])),)),
         ValueError, r"sorted_indices must be a permutation of range\(3\), got \[0, 0, 1\]"),
        # torch.nn: "INDICES element is out of DATA bounds" (internal)
        ("packed_sorted_indices_out_of_range",
         call((packed(5, torch.tensor([3, 2]), torch.tensor([0, 1, 7]), torch.tensor([0, 1, 7])),)),
         ValueError, r"sorted_indices must be a permutation of range\(3\), got \[0, 1, 7\]"),
        ("packed_unsorted_not_inverse",
         call((packed(5, torch.tensor([3, 2]), torch.tensor([1, 2, 0]), torch.tensor([1, 2, 0])),)),
         ValueError, "unsorted_indices must be the inverse permutation of sorted_indices"),
        ("packed_float_sorted_indices",
         call((packed(5, torch.tensor([3, 2]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1, 2])),)),
         ValueError, "sorted_indices must be a 1-D integer tensor .* got a torch.float32 tensor"),
        # --- constructor arguments ---
        ("ctor_input_size_0", lambda: cls(0, H), ValueError, "input_size must be greater than zero"),
        ("ctor_input_size_negative", lambda: cls(-1, H), ValueError, "input_size must be greater than zero"),
        ("ctor_hidden_size_0", lambda: cls(I, 0), ValueError, "hidden_size must be greater than zero"),
        ("ctor_hidden_size_negative", lambda: cls(I, -3), ValueError, "hidden_size must be greater than zero"),
        ("ctor_hidden_size_float", lambda: cls(I, 3.5), TypeError, "hidden_size should be of type int, got: float"),
        ("ctor_input_size_str", lambda: cls("4", H), TypeError, "input_size should be of type int, got: str"),
        ("ctor_num_layers_0", lambda: cls(I, H, num_layers=0), ValueError, "num_layers must be greater than zero"),
        ("ctor_num_layers_negative", lambda: cls(I, H, num_layers=-2), ValueError,
         "num_layers must be greater than zero"),
        # torch.nn: "'float' object cannot be interpreted as an integer"
        ("ctor_num_layers_float", lambda: cls(I, H, num_layers=2.0), TypeError,
         "num_layers should be of type int, got: float"),
        ("ctor_num_layers_none", lambda: cls(I, H, num_layers=None), TypeError,
         "num_layers should be of type int, got: NoneType"),
        ("ctor_dropout_negative", lambda: cls(I, H, num_layers=2, dropout=-0.1), ValueError,
         r"dropout should be a number in range \[0, 1\]"),
        ("ctor_dropout_above_1", lambda: cls(I, H, num_layers=2, dropout=1.5), ValueError,
         r"dropout should be a number in range \[0, 1\]"),
        ("ctor_dropout_nan", lambda: cls(I, H, num_layers=2, dropout=float("nan")), ValueError,
         r"dropout should be a number in range \[0, 1\]"),
        ("ctor_dropout_str", lambda: cls(I, H, num_layers=2, dropout="0.5"), ValueError,
         r"dropout should be a number in range \[0, 1\]"),
        ("ctor_dropout_bool", lambda: cls(I, H, num_layers=2, dropout=True), ValueError,
         r"dropout should be a number in range \[0, 1\]"),
        ("ctor_bias_str", lambda: cls(I, H, bias="no"), TypeError, "bias should be of type bool, got: str"),
        ("ctor_batch_first_int", lambda: cls(I, H, batch_first=1), TypeError,
         "batch_first should be of type bool, got: int"),
        # torch.nn: "Only Tensors of floating point and complex dtype can require gradients"
        ("ctor_dtype_int", lambda: cls(I, H, dtype=torch.int64), RuntimeError,
         "dtype must be a floating point or complex torch.dtype, got torch.int64"),
    ]
    if lstm:
        psize = r"\(num_layers \* num_directions, batch, proj_size\)"
        cases += [
            # torch.nn: IndexError "index 1 is out of bounds for dimension 0 with size 1"
            ("hx_tensor_for_lstm", call((X, z(1, 2, H))), TypeError,
             r"hx must be a tuple \(h_0, c_0\) of two tensors, got Tensor"),
            # torch.nn: IndexError "tuple index out of range"
            ("hx_tuple_of_1", call((X, (z(1, 2, H),))), TypeError,
             r"hx must be a tuple \(h_0, c_0\) of two tensors, got tuple of length 1"),
            ("hx_tuple_of_3", call((X, (z(1, 2, H),) * 3)), RuntimeError,
             r"hx must be a tuple \(h_0, c_0\) of two tensors, got tuple of length 3"),
            # torch.nn: AttributeError "'NoneType' object has no attribute 'dim'"
            ("c_0_none", call((X, (z(1, 2, H), None))), TypeError, "c_0 must be a Tensor, got NoneType"),
            ("c_0_width", call((X, (z(1, 2, H), z(1, 2, 5)))), RuntimeError,
             rf"Expected c_0 of size \(1, 2, 3\) {size}, got \(1, 2, 5\)"),
            ("c_0_batch", call((X, (z(1, 2, H), z(1, 3, H)))), RuntimeError,
             rf"Expected c_0 of size \(1, 2, 3\) {size}, got \(1, 3, 3\)"),
            # torch.nn: runs (silently mixes float32 into a float64 computation)
            ("c_0_float32", call((X, (z(1, 2, H), z(1, 2, H, dtype=torch.float32)))), RuntimeError,
             "c_0 has dtype torch.float32 but the input has dtype torch.float64"),
            ("c_0_meta", call((X, (z(1, 2, H), z(1, 2, H, device="meta")))), RuntimeError,
             "c_0 is on meta but the input is on cpu"),
            ("h_0_width_with_proj", call((X, (z(1, 2, H), z(1, 2, H))), proj_size=2), RuntimeError,
             rf"Expected h_0 of size \(1, 2, 2\) {psize}, got \(1, 2, 3\)"),
            ("c_0_width_with_proj", call((X, (z(1, 2, 2), z(1, 2, 2))), proj_size=2), RuntimeError,
             rf"Expected c_0 of size \(1, 2, 3\) {size}, got \(1, 2, 2\)"),
            ("ctor_proj_size_equal", lambda: cls(I, H, proj_size=H), ValueError,
             "proj_size has to be smaller than hidden_size"),
            ("ctor_proj_size_larger", lambda: cls(I, H, proj_size=5), ValueError,
             "proj_size has to be smaller than hidden_size"),
            ("ctor_proj_size_negative", lambda: cls(I, H, proj_size=-1), ValueError,
             "proj_size should be a positive integer or zero"),
            # torch.nn: TypeError from torch.empty about 'size'
            ("ctor_proj_size_float", lambda: cls(I, H, proj_size=1.5), TypeError,
             "proj_size should be of type int, got: float"),
        ]
    else:
        cases += [
            # torch.nn: AttributeError "'tuple' object has no attribute 'dim'"
            ("hx_tuple", call((X, (z(1, 2, H), z(1, 2, H)))), TypeError,
             r"hx must be a Tensor, got tuple \(only LSTM takes a tuple"),
            ("hx_tuple_of_1", call((X, (z(1, 2, H),))), TypeError, "hx must be a Tensor, got tuple"),
            ("hx_none_in_tuple", call((X, (z(1, 2, H), None))), TypeError, "hx must be a Tensor, got tuple"),
            ("hx_bidirectional_layers", call((X, z(2, 2, H)), num_layers=2, bidirectional=True), RuntimeError,
             rf"Expected hx of size \(4, 2, 3\) {size}, got \(2, 2, 3\)"),
            ("ctor_proj_size", lambda: cls(I, H, proj_size=2), ValueError,
             "proj_size argument is only supported for LSTM, not RNN or GRU"),
            ("ctor_proj_size_0", lambda: cls(I, H, 2, proj_size=0), ValueError, "is an argument of LSTM only"),
            ("ctor_unknown_keyword", lambda: cls(I, H, projection=2), TypeError,
             "unexpected keyword argument 'projection'"),
        ]
    if kind == "RNN":
        cases += [
            ("ctor_nonlinearity_unknown", lambda: cls(I, H, nonlinearity="gelu"), ValueError,
             "Unknown nonlinearity 'gelu'. Select from 'tanh' or 'relu'"),
            ("ctor_nonlinearity_case", lambda: cls(I, H, nonlinearity="TANH"), ValueError,
             "Unknown nonlinearity 'TANH'"),
            ("ctor_nonlinearity_none", lambda: cls(I, H, nonlinearity=None), ValueError,
             "Unknown nonlinearity 'None'"),
            ("complex_relu", lambda: cls(I, H, nonlinearity="relu", dtype=torch.complex128)(
                X.to(torch.complex128)), NotImplementedError, "nonlinearity 'relu' is not defined for complex inputs"),
        ]
    return [(kind,) + case for case in cases]


# ---------------------------------------------------------------------------------------------------
# The cells: LSTMCell, GRUCell, RNNCell
# ---------------------------------------------------------------------------------------------------

def _cell_cases(kind, cls):
    lstm = kind == "LSTMCell"
    st = re.escape("hx[0]") if lstm else "hx"

    make, state, call, with_param = _builders(cls, lstm, XC)

    cases = [
        ("input_0d", call((torch.tensor(1.0, dtype=D),)), ValueError, "Expected input to be 1D or 2D, got 0D"),
        ("input_3d", call((torch.randn(1, 2, I, dtype=D),)), ValueError, "Expected input to be 1D or 2D, got 3D"),
        # torch.nn: AttributeError "'list' object has no attribute 'dim'"
        ("input_list", call(([[1.0] * I],)), TypeError, "input must be a Tensor, got list"),
        ("input_none", call((None,)), TypeError, "input must be a Tensor, got NoneType"),
        ("features_batched", call((torch.randn(2, 6, dtype=D),)), RuntimeError,
         r"input.size\(-1\) must be equal to input_size. Expected 4, got 6"),
        ("features_unbatched", call((torch.randn(1, dtype=D),)), RuntimeError, "input_size. Expected 4, got 1"),
        # torch.nn: "mat1 and mat2 must have the same dtype, but got Long and Double"
        ("input_int64", call((torch.ones(2, I, dtype=torch.int64),)), RuntimeError,
         "input must be a floating point or complex tensor, got torch.int64"),
        ("input_bool", call((torch.ones(2, I, dtype=torch.bool),)), RuntimeError,
         "input must be a floating point or complex tensor, got torch.bool"),
        ("input_float32", call((XC.float(),)), RuntimeError,
         r"input dtype \(torch.float32\) does not match weight dtype \(torch.float64\) of parameter weight_ih"),
        ("input_complex", call((XC.to(torch.complex128),)), RuntimeError,
         r"input dtype \(torch.complex128\) does not match weight dtype"),
        ("param_dtype", with_param("weight_hh", lambda w: nn.Parameter(w.detach().float())), RuntimeError,
         r"weight dtype \(torch.float32\) of parameter weight_hh"),
        ("param_none", with_param("bias_hh", lambda w: None), TypeError,
         "parameter bias_hh must be a Tensor, got NoneType"),
        # before the fix ours silently returned meta tensors
        ("input_meta", call((torch.randn(2, I, dtype=D, device="meta"),)), RuntimeError,
         "the input is on meta but parameter weight_ih is on cpu"),
        ("param_meta", with_param("weight_hh", lambda w: nn.Parameter(w.detach().to("meta"))), RuntimeError,
         "the input is on cpu but parameter weight_hh is on meta"),
        ("hx_meta", call((XC, state(2, H, device="meta"))), RuntimeError, f"{st} is on meta but the input is on cpu"),
        ("hx_float32", call((XC, state(2, H, dtype=torch.float32))), RuntimeError,
         rf"{st} has dtype torch.float32 but the input has dtype torch.float64"),
        ("hx_int64", call((XC, state(2, H, dtype=torch.int64))), RuntimeError, rf"{st} has dtype torch.int64"),
        # torch.nn: "Input batch size 2 doesn't match hidden0 batch size 3" (the width taken as batch)
        ("hx_1d_for_batched", call((XC, state(H))), RuntimeError, rf"{st} must be 2-D like the input, got 1-D"),
        # torch.nn: "hidden0 has inconsistent hidden_size: got 1, expected 3"
        ("hx_2d_for_unbatched", call((torch.randn(I, dtype=D), state(1, H))), RuntimeError,
         rf"{st} must be 1-D like the input, got 2-D"),
        ("hx_3d", call((XC, state(1, 2, H))), ValueError, rf"{st} must be 2-D like the input, got 3-D"),
        ("hx_batch", call((XC, state(3, H))), RuntimeError,
         rf"{st} must have shape \(2, 3\) \(batch, hidden_size\), got \(3, 3\)"),
        ("hx_width", call((XC, state(2, 5))), RuntimeError,
         rf"{st} must have shape \(2, 3\) \(batch, hidden_size\), got \(2, 5\)"),
        ("hx_unbatched_width", call((torch.randn(I, dtype=D), state(5))), RuntimeError,
         rf"{st} must have shape \(3,\) \(hidden_size\), got \(5,\)"),
        ("hx_for_empty_batch", call((torch.randn(0, I, dtype=D), state(2, H))), RuntimeError,
         rf"{st} must have shape \(0, 3\)"),
        ("hx_int", call((XC, 3)), TypeError,
         r"hx must be a tuple \(h, c\) of two tensors, got int" if lstm else "hx must be a Tensor, got int"),
        ("hx_nested_list", call((XC, [[0.0] * H] * 2)), TypeError,
         "hx\\[0\\] must be a Tensor, got list" if lstm else "hx must be a Tensor, got list"),
        # --- constructor ---
        # torch.nn: "Trying to create tensor with negative dimension -1"
        ("ctor_input_size_negative", lambda: cls(-1, H), RuntimeError, "input_size must be at least 0, got -1"),
        ("ctor_hidden_size_negative", lambda: cls(I, -3), RuntimeError, "hidden_size must be at least 0, got -3"),
        # torch.nn: TypeError from torch.empty about 'size'
        ("ctor_input_size_float", lambda: cls(4.0, H), TypeError, "input_size should be of type int, got: float"),
        ("ctor_hidden_size_str", lambda: cls(I, "3"), TypeError, "hidden_size should be of type int, got: str"),
        ("ctor_dtype_int", lambda: cls(I, H, dtype=torch.int32), RuntimeError,
         "dtype must be a floating point or complex torch.dtype, got torch.int32"),
        ("ctor_num_layers", lambda: cls(I, H, num_layers=2), TypeError, "unexpected keyword argument 'num_layers'"),
    ]
    if lstm:
        cases += [
            # torch.nn: TypeError "lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors"
            ("hx_tensor_for_lstm", call((XC, z(2, H))), TypeError,
             r"hx must be a tuple \(h, c\) of two tensors, got Tensor"),
            ("hx_tuple_of_1", call((XC, (z(2, H),))), RuntimeError,
             r"hx must be a tuple \(h, c\) of two tensors, got tuple of length 1"),
            ("hx_tuple_of_3", call((XC, (z(2, H),) * 3)), RuntimeError, "got tuple of length 3"),
            # torch.nn: AttributeError "'NoneType' object has no attribute 'dim'"
            ("c_none", call((XC, (z(2, H), None))), TypeError, r"hx\[1\] must be a Tensor, got NoneType"),
            ("c_batch", call((XC, (z(2, H), z(3, H)))), RuntimeError, r"hx\[1\] must have shape \(2, 3\)"),
            ("c_width", call((XC, (z(2, H), z(2, 5)))), RuntimeError, r"hx\[1\] must have shape \(2, 3\)"),
            # torch.nn: runs (silently)
            ("c_float32", call((XC, (z(2, H), z(2, H, dtype=torch.float32)))), RuntimeError,
             r"hx\[1\] has dtype torch.float32"),
            ("c_rank", call((XC, (z(2, H), z(H)))), RuntimeError, r"hx\[1\] must be 2-D like the input, got 1-D"),
        ]
    else:
        cases += [
            # torch.nn: AttributeError "'tuple' object has no attribute 'dim'"
            ("hx_tuple", call((XC, (z(2, H), z(2, H)))), TypeError,
             rf"hx must be a Tensor, got tuple \(only LSTMCell takes a tuple"),
            ("hx_none_in_tuple", call((XC, (z(2, H), None))), TypeError, "hx must be a Tensor, got tuple"),
            ("hx_list_of_tensors", call((XC, [z(2, H)])), TypeError, "hx must be a Tensor, got list"),
        ]
    if kind == "RNNCell":
        def changed_nonlinearity():
            m = make()
            m.nonlinearity = "gelu"  # torch.nn: rejected at forward; ours used to compute relu here
            return m(XC)
        cases += [
            # torch.nn accepts it and fails only at forward
            ("ctor_nonlinearity_unknown", lambda: cls(I, H, nonlinearity="gelu"), ValueError,
             "Unknown nonlinearity 'gelu'. Select from 'tanh' or 'relu'"),
            ("nonlinearity_changed", changed_nonlinearity, RuntimeError, "Unknown nonlinearity 'gelu'"),
            ("complex_relu", lambda: cls(I, H, nonlinearity="relu", dtype=torch.complex128)(
                XC.to(torch.complex128)), NotImplementedError, "nonlinearity 'relu' is not defined for complex inputs"),
        ]
    return [(kind,) + case for case in cases]


def _all_cases(library):
    """Every case, its actions on `library`'s classes (fused_rnn or torch.nn)."""
    return ([c for kind in LAYERS for c in _layer_cases(kind, getattr(library, kind))]
            + [c for kind in CELLS for c in _cell_cases(kind, getattr(library, kind))])


CASES = _all_cases(fused_rnn)
TORCH_NN_ACTIONS = {(c[0], c[1]): c[2] for c in _all_cases(nn)}


# Where torch.nn gives no exception of its own to follow, ours stands alone. Each entry says what
# torch.nn does; the test checks that it still does, so that a torch release that starts checking
# one of these makes us follow it.
TORCH_NN_UNHELPFUL = {  # case -> torch.nn's failure (an exception type's name, or one a module), or "runs"
    # input or hx of the wrong kind: torch.nn calls .dim() or indexes it
    "input_list": "AttributeError", "input_none": "AttributeError", "input_tuple": "AttributeError",
    "hx_int": "AttributeError", "hx_nested_list": "AttributeError", "hx_tuple": "AttributeError", "hx_none_in_tuple": "AttributeError",
    "hx_list_of_tensors": "AttributeError", "c_0_none": "AttributeError", "c_none": "AttributeError",
    "hx_tensor_for_lstm": "IndexError", "packed_empty": "IndexError",
    # a tuple of one state: LSTM indexes its c_0, GRU and RNN call .dim() on the tuple
    "hx_tuple_of_1": {"LSTM": "IndexError", "GRU": "AttributeError", "RNN": "AttributeError"},
    # accepted silently: a float32 cell state in a float64 computation, a missing bias, a
    # parameter on another device, malformed PackedSequences (h_n loses or repeats a sequence)
    "c_0_float32": "runs", "c_float32": "runs", "param_none": "runs", "param_meta": "runs",
    "packed_zero_length": "runs", "packed_rows_extra": "runs", "packed_sorted_indices_length": "runs",
    "packed_sorted_indices_duplicate": "runs", "packed_unsorted_not_inverse": "runs",
    "packed_float_sorted_indices": "runs",
    # torch.nn's RNNCell takes any nonlinearity and fails at the first call
    "ctor_nonlinearity_unknown": "runs",
}
# torch.nn does not check a PackedSequence's batch_sizes and indices: it fails inside a kernel
# ("The size of tensor a (2) must match...", "start (3) + length (2) exceeds dimension size (4)",
# "INDICES element is out of DATA bounds", "zeros(): argument 'size' failed to unpack"). Ours is
# raised before torch.nn is asked (a PackedSequence that may not describe its data is never run)
# and names the field: a ValueError for a bad value, a TypeError for a bad kind.
PACKED_UNCHECKED_BY_TORCH_NN = {"packed_increasing", "packed_negative_length", "packed_rows_missing",
                                "packed_float_batch_sizes", "packed_2d_batch_sizes",
                                "packed_sorted_indices_out_of_range"}


def _outcome(action):
    try:
        action()
    except Exception as e:  # noqa: BLE001 - every outcome is compared
        return e
    return None


@pytest.mark.parametrize("kind,case,action,exc,match", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_rejects_as_torch_nn_does(kind, case, action, exc, match):
    """Differential: the same input through torch.nn. Where torch.nn raises a TypeError, ValueError
    or RuntimeError, ours is of its type and carries its message verbatim, followed by ours (which
    `match` checks)."""
    with pytest.raises(exc, match=match) as info:
        action()
    ours = info.value
    assert str(ours).strip(), "an empty message"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = _outcome(TORCH_NN_ACTIONS[(kind, case)])
    if isinstance(theirs, (TypeError, ValueError, RuntimeError)):
        if case in PACKED_UNCHECKED_BY_TORCH_NN:
            return
        assert type(ours) is type(theirs), f"torch.nn raises {type(theirs).__name__}: {theirs}"
        assert str(theirs) in str(ours), f"torch.nn's message missing: {theirs!r} not in {str(ours)!r}"
    else:
        got = "runs" if theirs is None else type(theirs).__name__
        assert case in TORCH_NN_UNHELPFUL, f"torch.nn: {got} ({theirs}); list it with the reason, or follow it"
        expected = TORCH_NN_UNHELPFUL[case]
        assert got == (expected[kind] if isinstance(expected, dict) else expected), f"torch.nn now: {got} ({theirs})"


@pytest.mark.parametrize("fault", ["width", "hx_width"])
def test_two_faults_get_the_exception_torch_nn_gives(fault):
    """A float32 cell given float64 input with a second fault: torch.nn reports the size first (a
    RuntimeError from its shape checks), not the dtype; so do we, in torch.nn's words and ours."""
    for kind in CELLS:
        m, ref = CELLS[kind](10, 20), getattr(nn, kind)(10, 20)
        x = torch.randn(3, 11 if fault == "width" else 10, dtype=D)
        hx = torch.randn(3, 21 if fault == "hx_width" else 20, dtype=D)
        hx = (hx, hx) if kind == "LSTMCell" else hx
        theirs = _outcome(lambda: ref(x, hx))
        torch_nn_words = ("input has inconsistent input_size" if fault == "width"
                          else "hidden0 has inconsistent hidden_size")
        with pytest.raises(RuntimeError, match=torch_nn_words) as info:
            m(x, hx)
        assert type(info.value) is type(theirs) and str(theirs) in str(info.value)
        ours = (f"{kind}: input.size(-1) must be equal to input_size. Expected 10, got 11" if fault == "width" else
                f"{kind}: {'hx[0]' if kind == 'LSTMCell' else 'hx'} must have shape (3, 20) (batch, hidden_size), "
                "got (3, 21)")
        assert ours in str(info.value), "our words describe the same fault"


def test_layer_dtype_message_as_torch_nn():
    """A float64 input into a float32 layer: torch.nn's ValueError and its advice, then ours."""
    for kind in LAYERS:
        m, ref = LAYERS[kind](10, 20), getattr(nn, kind)(10, 20)
        x = torch.randn(5, 2, 10, dtype=D)
        with pytest.raises(ValueError, match=re.escape(
                "RNN input dtype (torch.float64) does not match weight dtype (torch.float32). Convert input: ")) as info:
            m(x)
        assert str(_outcome(lambda: ref(x))) in str(info.value)


def test_matrix_covers_every_module():
    """At least 25 bad-input cases per module and cell, and no id twice."""
    per_kind = collections.Counter(c[0] for c in CASES)
    assert set(per_kind) == set(LAYERS) | set(CELLS)
    assert min(per_kind.values()) >= 25, per_kind
    ids = [(c[0], c[1]) for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_a_rejected_call_leaves_the_module_usable(kind):
    """After any error the module still works, and gives torch.nn's numbers."""
    cls, ref_cls = (LAYERS.get(kind) or CELLS[kind]), getattr(nn, kind)
    m = cls(I, H, dtype=D)
    ref = ref_cls(I, H, dtype=D)
    ref.load_state_dict(m.state_dict())
    x = X if kind in LAYERS else XC
    for bad in (x.float(), x[..., :2], torch.ones_like(x, dtype=torch.int64)):
        with pytest.raises((ValueError, TypeError, RuntimeError)):
            m(bad)
    for a, b in zip(torch.utils._pytree.tree_leaves(m(x)), torch.utils._pytree.tree_leaves(ref(x))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available() or not fused_rnn.built_with_cuda,
                    reason="needs a CUDA GPU and a CUDA build of fused_rnn")
@pytest.mark.parametrize("kind", list(LAYERS) + list(CELLS))
def test_cuda_device_mismatches(kind):
    """The same device checks with a real second device: CUDA input, CPU module, and CPU hx."""
    lstm = kind.startswith("LSTM")
    cls = LAYERS.get(kind) or CELLS[kind]
    x = (X if kind in LAYERS else XC).cuda()
    with pytest.raises(RuntimeError, match="the input is on cuda:0 but parameter weight_ih.* is on cpu"):
        cls(I, H, dtype=D)(x)
    m = cls(I, H, dtype=D, device="cuda")
    shape = (1, 2, H) if kind in LAYERS else (2, H)
    hx = (z(*shape), z(*shape).cuda()) if lstm else z(*shape)
    state = {"LSTM": "h_0", "LSTMCell": "hx[0]"}.get(kind, "hx")  # the CPU one
    with pytest.raises(RuntimeError, match=re.escape(f"{kind}: {state} is on cpu but the input is on cuda:0")):
        m(x, hx)
    with pytest.raises(RuntimeError, match="the input is on cpu but parameter weight_ih.* is on cuda:0"):
        m(x.cpu())


def test_constructor_warning_like_torch():
    """dropout with one layer: torch.nn warns and builds the module; so do we."""
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        fused_rnn.GRU(I, H, dropout=0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_cells_accept_zero_sizes_like_torch(bias, dtype):
    """torch.nn's cells accept input_size or hidden_size 0; so do ours, with the same results
    (input_size 0 without a bias: the input projection is an empty sum, zero)."""
    for kind in CELLS:
        for i, h in ((0, 3), (4, 0)):
            m, ref = CELLS[kind](i, h, bias=bias, dtype=dtype), getattr(nn, kind)(i, h, bias=bias, dtype=dtype)
            ref.load_state_dict(m.state_dict())
            x = torch.randn(2, i, dtype=dtype)
            torch.full((2, 4 * h), float("nan"), dtype=dtype)  # freed at once: NaN where buffers will be
            for a, b in zip(torch.utils._pytree.tree_leaves(m(x)), torch.utils._pytree.tree_leaves(ref(x))):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b)


def test_compiled_op_checks_shapes():
    """The ops check their arguments themselves, for callers that bypass the modules."""
    x = torch.randn(4, 3, dtype=D)
    w_ih, w_hh = torch.randn(16, 3, dtype=D), torch.randn(16, 4, dtype=D)
    h0, c0 = torch.zeros(2, 4, dtype=D), torch.zeros(2, 4, dtype=D)
    op = torch.ops.fused_rnn.layer_forward
    with pytest.raises(RuntimeError, match="batch_sizes sum to 5"):
        op(0, x, [3, 2], False, h0, c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="non-increasing"):
        op(0, x, [1, 3], False, h0, c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match=r"weight_hh must have shape \[16, 4\]"):
        op(0, x, [2, 2], False, h0, c0, w_ih, w_hh[:, :3], None, None, None, False)
    with pytest.raises(RuntimeError, match="LSTM needs the initial cell state c0"):
        op(0, x, [2, 2], False, h0, None, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="h0 has dtype Float"):
        op(0, x, [2, 2], False, h0.float(), c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="unknown cell kind 7"):
        op(7, x, [2, 2], False, h0, c0, w_ih, w_hh, None, None, None, False)
    with pytest.raises(RuntimeError, match="the input must be a floating point or complex tensor"):
        op(0, x.long(), [2, 2], False, h0, c0, w_ih, w_hh, None, None, None, False)


def test_compiled_op_refuses_a_projection_as_wide_as_the_hidden_state():
    """The op itself checks proj_size < hidden_size (the modules inherit torch.nn's check): a wider
    weight_hr would leave columns of the saved state unwritten."""
    H, P, B = 5, 12, 3
    x = torch.randn(4 * B, I, dtype=D)
    args = (0, x, [B] * 4, False, z(B, P), z(B, H), torch.randn(4 * H, I, dtype=D),
            torch.randn(4 * H, P, dtype=D), None, None, torch.randn(P, H, dtype=D), True)
    with pytest.raises(RuntimeError, match="fewer rows \\(proj_size\\) than hidden_size"):
        torch.ops.fused_rnn.layer_forward(*args)


def test_compiled_backward_op_checks_its_arguments():
    """layer_backward reads h_{t-1} from y and c_{t-1} from saved: a y or saved that do not belong
    to the call are refused by name, not read out of bounds."""
    x = torch.randn(4, 3, dtype=D)
    w_ih, w_hh = torch.randn(16, 3, dtype=D), torch.randn(16, 4, dtype=D)
    h0, c0 = torch.zeros(2, 4, dtype=D), torch.zeros(2, 4, dtype=D)
    y, _, _, saved = torch.ops.fused_rnn.layer_forward(0, x, [2, 2], False, h0, c0, w_ih, w_hh, None, None, None,
                                                       True)
    op = torch.ops.fused_rnn.layer_backward

    def call(y=y, saved=saved, c0=c0, grad_y=torch.ones_like(y)):
        return op(0, x, [2, 2], False, h0, c0, w_ih, w_hh, None, False, y, saved, grad_y, None, None, True)

    call()  # the right arguments pass
    with pytest.raises(RuntimeError, match=r"y must have shape \[4, 4\]"):
        call(y=y[:3])
    with pytest.raises(RuntimeError, match="y has dtype Float"):
        call(y=y.float())
    with pytest.raises(RuntimeError, match=r"saved must have shape \[4, 20\]"):
        call(saved=saved[:, :-1])
    with pytest.raises(RuntimeError, match="LSTM needs the initial cell state c0"):
        call(c0=None)
    with pytest.raises(RuntimeError, match=r"grad_y must have shape \[4, 4\]"):
        call(grad_y=torch.ones(4, 3, dtype=D))
