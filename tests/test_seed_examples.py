"""The examples of the seed tutorial (shared/seeds/004): the printed numbers, with fused_rnn."""
import pytest
import torch

import fused_rnn


def test_lstm_6_3_prints_what_torch_nn_prints():
    x = torch.tensor([[8., -3., 0., 1., 5., -2.]])
    torch.manual_seed(42)
    output, (h, c) = fused_rnn.LSTM(6, 3)(x)
    torch.testing.assert_close(output, torch.tensor([[-0.2443, 0.0840, 0.4837]]), rtol=0, atol=6e-5)
    torch.testing.assert_close(h, output)
    torch.testing.assert_close(c, torch.tensor([[-0.2616, 0.0902, 0.5288]]), rtol=0, atol=6e-5)
    torch.manual_seed(42)
    ref = torch.nn.LSTM(6, 3)(x)
    assert repr(fused_rnn.LSTM(6, 3)) == "LSTM(6, 3)"
    assert str((output, (h, c))).replace("SqueezeBackward1", "") == str(ref).replace("SqueezeBackward1", "")


@pytest.mark.cpu_only
def test_complex64_lstm():
    x = torch.tensor([[[8. + 0.j], [-3. + 0.j], [0. + 0.j]],
                      [[1. + 0.j], [5. + 0.j], [-2. + 0.j]]])
    torch.manual_seed(42)
    output, (h, c) = fused_rnn.LSTM(input_size=1, hidden_size=3, dtype=torch.complex64)(x)
    expected_last = torch.tensor([[-0.0046 - 0.0199j, -0.0496 - 0.0433j, 0.1316 - 0.2021j],
                                  [0.1221 + 0.0741j, 0.1806 + 0.7882j, -0.0890 - 0.0377j],
                                  [-0.2860 + 0.3574j, -0.0367 + 0.2503j, -0.3736 + 0.1591j]])
    expected_c = torch.tensor([[-0.0076 - 0.0525j, -0.0391 - 0.1021j, 0.3074 - 0.3711j],
                               [0.9092 + 0.1833j, -0.1939 + 1.1534j, -0.2418 + 0.1878j],
                               [-0.5759 + 0.6338j, -0.1179 + 0.3004j, -0.5170 + 0.0107j]])
    expected_first = torch.tensor([[0.0470 + 0.0483j, -0.0209 + 0.0511j, -0.0295 + 0.0117j],
                                   [0.0148 + 0.3332j, -0.1477 + 0.6714j, -0.3587 + 0.2890j],
                                   [-0.1949 + 0.0649j, 0.0522 - 0.1214j, -0.3186 - 0.1003j]])
    # Printed to 4 decimals in each part: |complex error| <= sqrt(2) * 5e-5.
    for actual, expected in ((output[0], expected_first), (output[1], expected_last),
                             (h[0], expected_last), (c[0], expected_c)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=7.1e-5)
