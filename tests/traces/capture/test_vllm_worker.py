"""The inline capture's worker side (tribunal.traces.capture.vllm_worker) on synthetic steps: the mapping of a
flattened batch to (request, position), the rows and scores a CaptureSink keeps per request, and what `take`
hands back. The worker inside a running vLLM is tested in test_vllm_inline.py."""

import numpy as np
import pytest
import torch

from tribunal.traces.capture.vllm_worker import CaptureSettings, CaptureSink, check_runner, step_rows


def test_step_rows_maps_each_row_to_its_position():
    # a decode (1 token at 40), a prompt chunk (positions 64..66), a new prompt (0..1), in the runner's order
    assert step_rows([1, 3, 2], [40, 64, 0]).tolist() == [40, 64, 65, 66, 0, 1]
    assert step_rows([], []).size == 0


def sink(dtype="float32", temperature=0.7):
    return CaptureSink(CaptureSettings((1, 3), dtype, temperature))


def states_for(positions, d=4):
    """(rows, 2 layers, d) states whose values encode the position and the layer, to see where each row went."""
    p = torch.as_tensor(positions, dtype=torch.float32)[:, None, None]
    layer = torch.tensor([0.0, 0.5])[None, :, None]
    return (p + layer).expand(-1, -1, d).clone()


def test_a_sink_keeps_each_requests_rows_in_position_order_across_steps():
    s = sink()
    vocab = torch.randn(2, 11)
    # step 1: request a's prompt in two chunks (the first discarded by vLLM), request b's whole prompt
    s.add_step(["a", "b"], [3, 2], [0, 0], states_for([0, 1, 2, 0, 1]), vocab)
    s.add_samples(["a", "b"], [[], [7]])  # a's row was a partial prefill: nothing sampled from it
    s.add_step(["b", "a"], [1, 2], [2, 3], states_for([2, 3, 4]), vocab[[1, 0]])
    s.add_samples(["b", "a"], [[5], [9]])
    a, b = s.take(["a", "b"])
    assert a["positions"] == [0, 1, 2, 3, 4] and b["positions"] == [0, 1, 2]
    rows = np.frombuffer(a["states"], dtype=a["dtype"]).reshape(a["shape"])
    assert rows.shape == (5, 2, 4) and rows[:, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert rows[:, 1, 0].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    # scores by the position the sampled token takes: b sampled 7 at 2 and 5 at 3; a only 9 at 5
    assert [k for k in b["scores"]] == ["2", "3"] and b["scores"]["2"][0] == 7 and b["scores"]["3"][0] == 5
    assert list(a["scores"]) == ["5"] and a["scores"]["5"][0] == 9
    assert s.take(["a"])[0]["positions"] == []  # taken: forgotten


def test_the_scores_are_the_log_prob_and_entropy_at_the_runs_temperature():
    s = sink(temperature=0.7)
    logits = torch.randn(2, 13, dtype=torch.float64).float()
    s.add_step(["a", "b"], [1, 1], [4, 9], states_for([4, 9]), logits)
    s.add_samples(["a", "b"], [[3], [12]])
    a, b = s.take(["a", "b"])
    logp = torch.log_softmax(logits / 0.7, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert a["scores"]["5"][1] == pytest.approx(float(logp[0, 3]), abs=1e-6)
    assert b["scores"]["10"][1] == pytest.approx(float(logp[1, 12]), abs=1e-6)
    assert a["scores"]["5"][2] == pytest.approx(float(entropy[0]), abs=1e-5)
    assert b["scores"]["10"][2] == pytest.approx(float(entropy[1]), abs=1e-5)


def test_the_sampler_editing_its_logits_in_place_does_not_change_the_scores():
    s = sink(temperature=0.5)
    logits = torch.randn(1, 9)
    expected = float(torch.log_softmax(logits / 0.5, -1)[0, 2])
    s.add_step(["a"], [1], [0], states_for([0]), logits)
    logits.div_(0.5)  # vLLM's apply_temperature divides the tensor it was given, in place
    s.add_samples(["a"], [[2]])
    assert s.take(["a"])[0]["scores"]["1"][1] == pytest.approx(expected, abs=1e-6)


def test_a_recomputed_position_keeps_the_last_computation():
    """vLLM preempts a request and later recomputes its tokens: the later rows are the state later tokens saw."""
    s = sink()
    vocab = torch.randn(1, 5)
    s.add_step(["a"], [3], [0], states_for([0, 1, 2]), vocab)
    s.add_samples(["a"], [[1]])
    recomputed = states_for([0, 1, 2, 3]) + 100
    s.add_step(["a"], [4], [0], recomputed, vocab)
    s.add_samples(["a"], [[2]])
    a = s.take(["a"])[0]
    rows = np.frombuffer(a["states"], dtype=a["dtype"]).reshape(a["shape"])
    assert a["positions"] == [0, 1, 2, 3] and rows[:, 0, 0].tolist() == [100, 101, 102, 103]
    assert a["scores"]["3"][0] == 1 and a["scores"]["4"][0] == 2


def test_padding_rows_past_the_scheduled_tokens_are_not_kept():
    s = sink()
    s.add_step(["a"], [2], [0], states_for([0, 1, 99, 99]), torch.randn(1, 5))  # 2 rows of padding
    assert s.take(["a"])[0]["positions"] == [0, 1]


def test_bfloat16_rows_are_kept_as_the_stores_16_bit_words():
    s = sink("bfloat16")
    states = torch.randn(2, 2, 4)
    s.add_step(["a"], [2], [0], states, torch.randn(1, 5))
    a = s.take(["a"])[0]
    assert a["dtype"] == "uint16"
    words = np.frombuffer(a["states"], dtype=np.uint16).reshape(a["shape"])
    back = torch.from_numpy(words.astype(np.int16)).view(torch.bfloat16).float()
    assert torch.equal(back, states.to(torch.bfloat16).float())


def test_settings_travel_through_vllms_additional_config():
    settings = CaptureSettings((3, 5, 6), "float16", 0.6, monitor_layers=(2, 5))
    assert CaptureSettings.from_config(settings.as_config()) == settings
    assert settings.captured_layers == [2, 3, 5, 6]


def test_readouts_score_every_row_from_the_stored_words_and_drain_once():
    s = CaptureSink(CaptureSettings((3,), "float16", 1.0, monitor_layers=(1,)))  # captured: 1 (monitor), 3
    w = [0.25, -1.0, 0.5, 2.0]
    s.set_readouts([["token_score", 1, w, -0.5]])
    states = states_for([0, 1, 2]) * 1.001  # not representable in float16: the read-out sees the stored rounding
    s.add_step(["a"], [3], [0], states, torch.randn(1, 5))
    s.add_samples(["a"], [[4]])
    drained = s.drain()["a"]
    rounded = states[:, 0].to(torch.float16).float()
    expected = (rounded @ torch.tensor(w) - 0.5).tolist()
    assert drained["positions"] == [0, 1, 2] and drained["token_score"] == pytest.approx(expected, abs=1e-6)
    assert list(drained["scores"]) == ["3"] and s.drain() == {}
    rows = s.take(["a"])[0]
    assert rows["shape"] == [3, 1, 4]  # only the stored layer is kept
    with pytest.raises(ValueError, match="does not capture"):
        s.set_readouts([["chunk_logit", 2, w, 0.0]])


def test_a_prompt_token_asked_for_is_scored_from_the_row_before_it():
    """A forced answer's cue arrives in its continuation's prompt: scored as if sampled, from the final hidden
    state of the row before it through the LM head."""
    s = sink(temperature=0.5)
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(3, 4)
    s.score_tokens("a", {2: 6})  # the token at position 2, predicted by the row at position 1
    s.add_step(["a"], [3], [0], states_for([0, 1, 2]), torch.randn(1, 7), hidden, head)
    logp = torch.log_softmax(head(hidden[1]) / 0.5, -1)
    token, logprob, entropy = s.take(["a"])[0]["scores"]["2"]
    assert token == 6 and logprob == pytest.approx(float(logp[6]), abs=1e-5)
    assert entropy == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-5)


def test_a_runner_without_what_the_capture_reads_is_refused_with_the_fallback_named():
    class OtherRunner:
        input_batch = positions = None

    with pytest.raises(RuntimeError, match="execute_model_state.*--capture forward"):
        check_runner(OtherRunner())


def test_a_request_holds_its_own_rows_only():
    """Rows are filed per request, not as views of the step's array: a short request kept in flight does not
    keep a long one's rows alive after it is taken (the in-flight cap counts each request's own rows)."""
    s = sink()
    s.add_step(["long", "short"], [500, 1], [0, 7], states_for(list(range(500)) + [7]), torch.randn(2, 5))
    s.take(["long"])
    short = s.requests["short"].rows
    assert short.words.base is None and short.words.nbytes <= 16 * 2 * 4 * 4


def test_rows_copied_asynchronously_are_read_only_once_arrived(monkeypatch):
    """From a GPU a step's rows travel while vLLM goes on: they are filed at the next step (or a take), after
    waiting for the copy, never read before."""
    import tribunal.traces.capture.vllm_worker as worker

    real, waits = worker.host_copy, []

    def copying(states, dtype):
        words, _ = real(states, dtype)
        arrived = words.copy()
        words[:] = -1  # not there yet: what the host buffer holds while the copy is in flight
        return words, lambda: (waits.append(1), words.__setitem__(slice(None), arrived))

    monkeypatch.setattr(worker, "host_copy", copying)
    s = sink()
    s.add_step(["a"], [2], [0], states_for([0, 1]), torch.randn(1, 5))
    s.add_samples(["a"], [[3]])
    assert waits == []
    s.add_step(["a"], [1], [2], states_for([2]), torch.randn(1, 5))
    assert waits == [1]
    rows = s.take(["a"])[0]
    assert waits == [1, 1] and rows["positions"] == [0, 1, 2]
    assert np.frombuffer(rows["states"], dtype=rows["dtype"]).reshape(rows["shape"])[:, 0, 0].tolist() == [0, 1, 2]
